"""The watch folder: files and zip archives dropped in the inbox are ingested like received ones.

A file is picked up only once it has stopped changing (``watch_settle_seconds``) and never while
it is named as in progress (a leading '.', or ``.part``/``.tmp``/``.partial``/``.crdownload``),
so a half-copied file is not mistaken for a truncated one. A file leaves the inbox only after
it is durably stored and indexed (removed) or set aside with its reason (quarantined): a crash
at any point leaves it in the inbox, and the next pass, being idempotent, finishes the job.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sqlalchemy.orm import Session, sessionmaker

from radflow.db import unit_of_work
from radflow.db.base import utcnow
from radflow.errors import InvalidInstance
from radflow.ingest import IngestReport, ingest_file, rejection
from radflow.outages import describe, is_outage
from radflow.settings import Settings
from radflow.store import ObjectStore

logger = logging.getLogger(__name__)

IN_PROGRESS_SUFFIXES = frozenset({".part", ".tmp", ".partial", ".crdownload", ".filepart"})
_COPY_CHUNK = 1 << 20


@dataclass
class WatchReport(IngestReport):
    """What one pass over the inbox did."""

    quarantined: int = 0
    waiting: int = 0  # files still being written, left for a later pass

    def summary(self) -> str:
        text = (
            f"stored {self.stored}, duplicates {self.duplicates}, "
            f"quarantined {self.quarantined}, waiting {self.waiting}"
        )
        if self.reasons:
            text += " (" + ", ".join(f"{r}: {n}" for r, n in sorted(self.reasons.items())) + ")"
        return text


@dataclass(frozen=True)
class Quarantined:
    path: Path
    reason_file: Path


def watch_once(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    *,
    now: float | None = None,
) -> WatchReport:
    """One pass over the inbox: ingest every settled file or zip, quarantine the bad ones."""
    report = WatchReport()
    inbox = settings.inbox
    inbox.mkdir(parents=True, exist_ok=True)
    settled_before = (time.time() if now is None else now) - settings.watch_settle_seconds
    for path in _candidates(inbox):
        try:
            stat = path.stat()
        except FileNotFoundError:  # moved away by its writer meanwhile
            continue
        if stat.st_mtime > settled_before:
            report.waiting += 1
            continue
        if zipfile.is_zipfile(path):
            _ingest_archive(path, settings, session_factory, store, report)
        else:
            _ingest_one(path, path.name, settings, session_factory, store, report)
        path.unlink(missing_ok=True)
    _remove_empty_folders(inbox)
    if report.stored or report.quarantined:
        logger.info("watch folder: %s", report.summary())
    return report


def _candidates(inbox: Path) -> Iterator[Path]:
    for path in sorted(inbox.rglob("*")):
        relative = path.relative_to(inbox)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() in IN_PROGRESS_SUFFIXES or not path.is_file():
            continue
        yield path


def _ingest_one(
    path: Path,
    origin: str,
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    report: WatchReport,
) -> None:
    """Ingest ``path`` (named ``origin`` for people); on refusal, quarantine a copy of it."""
    try:
        header, is_new = ingest_file(
            path, settings=settings, session_factory=session_factory, store=store
        )
    except InvalidInstance as exc:
        quarantine(path, origin, exc, settings, session_factory)
        report.quarantined += 1
        report.reasons[exc.reason] += 1
        return
    report.count(header.study_uid, is_new)


def quarantine(
    path: Path,
    origin: str,
    exc: InvalidInstance,
    settings: Settings,
    session_factory: sessionmaker[Session],
) -> Quarantined:
    """Set ``path`` aside with a ``<name>.reason.json`` and a Rejection row (source "folder")."""
    folder = settings.quarantine
    folder.mkdir(parents=True, exist_ok=True)
    target = _free_name(folder, _flat_name(origin))
    _durable_copy(path, target)
    reason_file = target.with_name(target.name + ".reason.json")
    reason = {
        "reason": exc.reason,
        "message": str(exc),
        "source": "folder",
        "original_name": origin,
        "at": utcnow().isoformat(),
    }
    reason_file.write_text(json.dumps(reason, indent=2) + "\n", encoding="utf-8")
    with unit_of_work(session_factory) as session:
        session.add(rejection("folder", exc, origin=origin, quarantine_key=target.name))
    logger.warning("quarantined %s: %s", target.name, exc.reason)
    return Quarantined(target, reason_file)


def _flat_name(origin: str) -> str:
    # One flat folder: archive members and sub-folder files keep their path in the name only.
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in origin)
    return cleaned.lstrip(".")[:150] or "unnamed"


def _free_name(folder: Path, name: str) -> Path:
    target = folder / name
    n = 1
    while target.exists():
        target = folder / f"{name}.{n}"
        n += 1
    return target


def _durable_copy(source: Path, target: Path) -> None:
    """Copy, fsync, then rename into place: the quarantined file is whole or absent."""
    tmp = target.with_name(f".{target.name}.tmp")
    with source.open("rb") as src, tmp.open("wb") as dst:
        shutil.copyfileobj(src, dst, _COPY_CHUNK)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, target)


class UnsafeArchive(InvalidInstance):
    """A zip Radflow does not unpack: corrupt, encrypted, escaping its folder, or a zip bomb."""


def _ingest_archive(
    path: Path,
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    report: WatchReport,
) -> None:
    """Ingest every member of the zip at ``path``; a bad member is quarantined on its own."""
    work = settings.data_dir / "tmp"
    work.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory(dir=work) as tmp:
            members = _checked_members(archive, path.name, settings)
            for i, member in enumerate(members):
                origin = f"{path.name}/{member.filename}"
                extracted = Path(tmp) / f"{i:06d}" / PurePosixPath(member.filename).name
                extracted.parent.mkdir()
                _extract(archive, member, extracted, settings.max_archive_bytes)
                _ingest_one(extracted, origin, settings, session_factory, store, report)
                extracted.unlink()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError) as exc:
        # RuntimeError: encrypted member; NotImplementedError: unknown compression method.
        bad = UnsafeArchive("bad-archive", f"{path.name}: unreadable zip archive ({exc})")
        _quarantine_archive(path, bad, settings, session_factory, report)
    except UnsafeArchive as exc:
        _quarantine_archive(path, exc, settings, session_factory, report)


def _quarantine_archive(
    path: Path,
    exc: InvalidInstance,
    settings: Settings,
    session_factory: sessionmaker[Session],
    report: WatchReport,
) -> None:
    # Members already ingested stay ingested (each one is valid on its own); the archive is kept
    # whole for whoever investigates it.
    quarantine(path, path.name, exc, settings, session_factory)
    report.quarantined += 1
    report.reasons[exc.reason] += 1


def _checked_members(
    archive: zipfile.ZipFile, name: str, settings: Settings
) -> list[zipfile.ZipInfo]:
    """The archive's files, after refusing path escapes and declared sizes past the limits."""
    members = [m for m in archive.infolist() if not m.is_dir()]
    if len(members) > settings.max_archive_members:
        raise UnsafeArchive(
            "archive-too-large",
            f"{name}: {len(members)} files exceeds the limit of {settings.max_archive_members} "
            "(RADFLOW_MAX_ARCHIVE_MEMBERS); split the archive",
        )
    for member in members:
        member_path = PurePosixPath(member.filename.replace("\\", "/"))
        if member_path.is_absolute() or ".." in member_path.parts or ":" in member.filename:
            raise UnsafeArchive(
                "unsafe-archive",
                f"{name}: member {member.filename[:100]!r} points outside the archive",
            )
    total = sum(m.file_size for m in members)
    if total > settings.max_archive_bytes:
        raise UnsafeArchive(
            "archive-too-large",
            f"{name}: {total} bytes uncompressed exceeds the limit of "
            f"{settings.max_archive_bytes} (RADFLOW_MAX_ARCHIVE_BYTES); split the archive",
        )
    return [m for m in members if not PurePosixPath(m.filename).name.startswith(".")]


def _extract(archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, limit: int) -> None:
    """Stream one member to ``target``, never writing more than it declared (zip bombs lie)."""
    allowed = min(member.file_size, limit)
    written = 0
    with archive.open(member) as src, target.open("wb") as dst:
        while chunk := src.read(_COPY_CHUNK):
            written += len(chunk)
            if written > allowed:
                raise UnsafeArchive(
                    "archive-too-large",
                    f"member {member.filename[:100]!r} inflates past its declared size",
                )
            dst.write(chunk)


def _remove_empty_folders(inbox: Path) -> None:
    for folder in sorted((p for p in inbox.rglob("*") if p.is_dir()), reverse=True):
        if not any(part.startswith(".") for part in folder.relative_to(inbox).parts):
            try:
                folder.rmdir()
            except OSError:  # not empty: something is still being dropped there
                continue


def watch_forever(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    after_pass: Callable[[], object] | None = None,
    *,
    passes: int | None = None,
) -> None:
    """Scan the inbox every ``watch_interval_seconds``; ``after_pass`` runs after each scan.

    ``passes`` bounds the loop (tests, ``--once``); None runs until interrupted. An outage of
    the database or the object store delays the work and never ends the service: the files stay
    in the inbox and the next pass tries again.
    """
    done = 0
    while passes is None or done < passes:
        started = time.monotonic()
        try:
            watch_once(settings, session_factory, store)
            if after_pass is not None:
                after_pass()
        except Exception as exc:
            if not is_outage(exc):
                raise
            logger.warning("watch folder pass failed, retrying: %s", describe(exc))
        done += 1
        if passes is None or done < passes:
            time.sleep(max(0.0, settings.watch_interval_seconds - (time.monotonic() - started)))
