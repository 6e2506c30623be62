"""The watch folder: files and zip archives dropped in the inbox are ingested like received ones.

A file is picked up only once it has stopped changing (``watch_settle_seconds``) and never while
it is named as in progress (a leading '.', or ``.part``/``.tmp``/``.partial``/``.crdownload``),
so a half-copied file is not mistaken for a truncated one. A file leaves the inbox only after
it is durably stored and indexed (removed) or set aside with its reason (quarantined): a crash
at any point leaves it in the inbox, and the next pass, being idempotent, finishes the job.

No entry blocks the others. Whatever processing an entry raises, unless it is an outage
(:mod:`radflow.outages`: the pass ends and the entry waits for the next), sets the entry aside
with a reason (``unprocessable`` for an error nobody foresaw, its traceback logged once) and the
pass goes on. What quarantine keeps is bounded by what was dropped:

- a symbolic link is never followed (it could point anywhere on this machine): it is refused
  (``symlink``) without its target being read, and removed from the inbox;
- a zip is read member by member, each extracted under a name of Radflow's own (a member's name
  never reaches the filesystem) and only if it starts like a DICOM file (a 1 GiB run of zeros
  is never inflated); a bad member is refused on its own and the archive itself is kept in
  quarantine, once, never an inflated member.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sqlalchemy.orm import Session, sessionmaker

from radflow.db import unit_of_work
from radflow.db.base import utcnow
from radflow.errors import InvalidInstance
from radflow.ingest import IngestReport, ingest_file, refusal, rejection
from radflow.outages import describe, is_outage
from radflow.settings import Settings
from radflow.store import ObjectStore

logger = logging.getLogger(__name__)

IN_PROGRESS_SUFFIXES = frozenset({".part", ".tmp", ".partial", ".crdownload", ".filepart"})
_COPY_CHUNK = 1 << 20
# A DICOM file (PS3.10) starts with a 128-byte preamble and "DICM"; read_header refuses any
# other file as not-dicom, so a member without them need not be extracted to be refused.
_PREAMBLE = 128
_MAGIC = b"DICM"


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

    def set_aside(self, exc: InvalidInstance) -> None:
        self.quarantined += 1
        self.reasons[exc.reason] += 1


@dataclass(frozen=True)
class Quarantined:
    kept: Path | None  # the copy of what was dropped, None for a link (nothing to keep)
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
            status = path.lstat()
        except FileNotFoundError:  # moved away by its writer meanwhile
            continue
        if stat.S_ISLNK(status.st_mode):
            _refuse_link(path, settings, session_factory, report)
        elif not stat.S_ISREG(status.st_mode):
            continue  # a pipe or a device: opening it could block the pass
        elif status.st_mtime > settled_before:
            report.waiting += 1
            continue
        else:
            _ingest_entry(path, settings, session_factory, store, report)
        path.unlink(missing_ok=True)
    _remove_empty_folders(inbox)
    if report.stored or report.quarantined:
        logger.info("watch folder: %s", report.summary())
    return report


def _candidates(inbox: Path) -> Iterator[Path]:
    for path in sorted(inbox.rglob("*")):  # never descends into a linked folder
        relative = path.relative_to(inbox)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() in IN_PROGRESS_SUFFIXES or (path.is_dir() and not path.is_symlink()):
            continue
        yield path


def _ingest_entry(
    path: Path,
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    report: WatchReport,
) -> None:
    """Ingest the file or zip at ``path``; whatever fails but an outage sets it aside."""
    try:
        if _is_archive(path):
            _ingest_archive(path, settings, session_factory, store, report)
        else:
            _ingest_one(path, path.name, settings, session_factory, store, report)
    except Exception as exc:
        if is_outage(exc):
            raise
        problem = refusal(exc, path.name)
        quarantine(problem, path.name, settings, session_factory, content=path)
        report.set_aside(problem)


def _is_archive(path: Path) -> bool:
    """A zip, and not a DICOM file whose last bytes happen to read like a zip's end record."""
    with path.open("rb") as f:
        head = f.read(_PREAMBLE + len(_MAGIC))
    return head[_PREAMBLE:] != _MAGIC and zipfile.is_zipfile(path)


def _refuse_link(
    path: Path, settings: Settings, session_factory: sessionmaker[Session], report: WatchReport
) -> None:
    try:
        target = os.readlink(path)  # the link itself, never its target
    except FileNotFoundError:  # removed by its writer meanwhile
        return
    problem = InvalidInstance(
        "symlink",
        f"{path.name}: a symbolic link (to {target}); links in the inbox are never "
        "followed, as they could point anywhere on this machine: copy the file itself in",
    )
    quarantine(problem, path.name, settings, session_factory)
    report.set_aside(problem)


def _ingest_one(
    path: Path,
    origin: str,
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    report: WatchReport,
    kept: Callable[[], Path] | None = None,
) -> None:
    """Ingest ``path`` (named ``origin`` for people); on refusal, quarantine it.

    ``kept``: what to keep instead of a copy of ``path`` (an archive member's archive).
    """
    outcome = ingest_file(path, settings=settings, session_factory=session_factory, store=store)
    if outcome.refused is None:
        report.add(origin, outcome)
        return
    if kept is None:
        quarantine(outcome.refused, origin, settings, session_factory, content=path)
    else:
        quarantine(outcome.refused, origin, settings, session_factory, kept=kept())
    report.set_aside(outcome.refused)


def quarantine(
    exc: InvalidInstance,
    origin: str,
    settings: Settings,
    session_factory: sessionmaker[Session],
    *,
    content: Path | None = None,
    kept: Path | None = None,
) -> Quarantined:
    """Set ``origin`` aside: a ``<name>.reason.json`` and a Rejection row (source "folder").

    ``content`` is copied into the quarantine folder; ``kept`` is what is already there for it
    (an archive kept for one of its members); with neither, only the reason is kept.
    """
    folder = settings.quarantine
    folder.mkdir(parents=True, exist_ok=True)
    name = _flat_name(origin)
    if content is not None:
        kept = _free_name(folder, name)
        _durable_copy(content, kept)
        name = kept.name  # the reason file sits beside the copy: <copy name>.reason.json
    reason_file = _free_name(folder, name + ".reason.json")
    reason = {
        "reason": exc.reason,
        "message": str(exc),
        "source": "folder",
        "original_name": origin,
        "kept": kept.name if kept is not None else None,
        "at": utcnow().isoformat(),
    }
    reason_file.write_text(json.dumps(reason, indent=2) + "\n", encoding="utf-8")
    key = kept.name if kept is not None else reason_file.name
    with unit_of_work(session_factory) as session:
        session.add(rejection("folder", exc, origin=origin, quarantine_key=key))
    logger.warning("quarantined %s: %s", key, exc.reason)
    return Quarantined(kept, reason_file)


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


class _KeptArchive:
    """The archive's copy in quarantine, made when its first bad member is refused."""

    def __init__(self, path: Path, settings: Settings) -> None:
        self.path, self.settings = path, settings
        self.copy: Path | None = None

    def __call__(self) -> Path:
        if self.copy is None:
            folder = self.settings.quarantine
            folder.mkdir(parents=True, exist_ok=True)
            self.copy = _free_name(folder, _flat_name(self.path.name))
            _durable_copy(self.path, self.copy)
        return self.copy


def _ingest_archive(
    path: Path,
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    report: WatchReport,
) -> None:
    """Ingest every member of the zip at ``path``; a bad member is refused on its own."""
    work = settings.data_dir / "tmp"
    work.mkdir(parents=True, exist_ok=True)
    kept = _KeptArchive(path, settings)
    try:
        with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory(dir=work) as tmp:
            members = _checked_members(archive, path.name, settings)
            for i, member in enumerate(members):
                origin = f"{path.name}/{member.filename}"
                # A name of our own (the member's, made safe, only for messages): however long
                # or odd the member's name, extracting it cannot fail.
                extracted = Path(tmp) / f"{i:06d}" / _flat_name(Path(member.filename).name)[:100]
                try:
                    _extract(archive, member, extracted, origin, settings.max_archive_bytes)
                    _ingest_one(extracted, origin, settings, session_factory, store, report, kept)
                except UnsafeArchive:
                    raise
                except Exception as exc:
                    if is_outage(exc):
                        raise
                    problem = refusal(exc, origin)
                    quarantine(problem, origin, settings, session_factory, kept=kept())
                    report.set_aside(problem)
                shutil.rmtree(extracted.parent, ignore_errors=True)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        bad = UnsafeArchive("bad-archive", f"{path.name}: unreadable zip archive ({exc})")
        _quarantine_archive(path, bad, settings, session_factory, report, kept)
    except UnsafeArchive as exc:
        _quarantine_archive(path, exc, settings, session_factory, report, kept)


def _quarantine_archive(
    path: Path,
    exc: InvalidInstance,
    settings: Settings,
    session_factory: sessionmaker[Session],
    report: WatchReport,
    kept: _KeptArchive,
) -> None:
    # Members already ingested stay ingested (each one is valid on its own); the archive is kept
    # whole, once, for whoever investigates it.
    quarantine(exc, path.name, settings, session_factory, kept=kept())
    report.set_aside(exc)


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


def _extract(
    archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, origin: str, limit: int
) -> None:
    """Stream one member to ``target``, if it starts like a DICOM file, never writing more than
    it declared (zip bombs lie). A member the zip cannot give back refuses the whole archive."""
    allowed = min(member.file_size, limit)
    written = 0
    try:
        with archive.open(member) as src:
            head = src.read(_PREAMBLE + len(_MAGIC))
            if head[_PREAMBLE:] != _MAGIC:
                raise InvalidInstance(
                    "not-dicom", f"{origin}: not a DICOM file (no DICM preamble); not extracted"
                )
            target.parent.mkdir()
            with target.open("wb") as dst:
                chunk = head
                while chunk:
                    written += len(chunk)
                    if written > allowed:
                        raise UnsafeArchive(
                            "archive-too-large",
                            f"member {member.filename[:100]!r} inflates past its declared size",
                        )
                    dst.write(chunk)
                    chunk = src.read(_COPY_CHUNK)
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, zlib.error, EOFError) as exc:
        # RuntimeError: an encrypted member; NotImplementedError: an unknown compression method.
        raise UnsafeArchive(
            "bad-archive", f"{origin}: unreadable zip archive member ({describe(exc)})"
        ) from None


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
