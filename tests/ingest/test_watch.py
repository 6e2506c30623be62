"""The watch folder on both backends: settled files in, bad ones quarantined with a reason."""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path

from factories import dicom_bytes
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from radflow import ingest
from radflow.db import Instance, Rejection
from radflow.ingest.watch import watch_forever, watch_once
from radflow.settings import Settings
from radflow.store import ObjectStore

LATER = time.time() + 3600  # "now" for a pass that sees every file as settled


def _drop(settings: Settings, name: str, data: bytes) -> Path:
    path = settings.inbox / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _instances(session_factory: sessionmaker[Session]) -> int:
    with session_factory() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


def _rejections(session_factory: sessionmaker[Session]) -> list[tuple[str, str, str | None]]:
    with session_factory() as session:
        rows = session.scalars(select(Rejection).order_by(Rejection.id)).all()
        return [(r.source, r.reason, r.quarantine_key) for r in rows]


def test_settled_files_are_ingested_and_leave_the_inbox(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    good = _drop(settings, "sub/one.dcm", dicom_bytes())
    fresh = _drop(settings, "two.dcm", dicom_bytes())
    hidden = _drop(settings, ".three.dcm", dicom_bytes())
    partial = _drop(settings, "four.dcm.part", dicom_bytes())
    os.utime(good, (time.time() - 60, time.time() - 60))

    report = watch_once(settings, session_factory, store, now=time.time())

    # The fresh file may still be being copied: it waits; in-progress names are never touched.
    assert (report.stored, report.waiting, report.quarantined) == (1, 1, 0)
    assert not good.exists() and fresh.exists() and hidden.exists() and partial.exists()
    assert not (settings.inbox / "sub").exists()  # emptied sub-folders go too

    report = watch_once(settings, session_factory, store, now=LATER)
    assert report.stored == 1 and not fresh.exists()
    assert _instances(session_factory) == 2


def test_bad_files_are_quarantined_with_a_reason(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    _drop(settings, "notes.txt", b"not an image at all")
    _drop(settings, "cut.dcm", dicom_bytes()[:-500])

    report = watch_once(settings, session_factory, store, now=LATER)

    assert report.quarantined == 2 and dict(report.reasons) == {"not-dicom": 1, "truncated": 1}
    assert list(settings.inbox.iterdir()) == []
    reason = json.loads((settings.quarantine / "notes.txt.reason.json").read_text())
    assert reason["reason"] == "not-dicom" and "not a DICOM file" in reason["message"]
    assert (settings.quarantine / "notes.txt").read_bytes() == b"not an image at all"
    assert sorted(_rejections(session_factory)) == [
        ("folder", "not-dicom", "notes.txt"),
        ("folder", "truncated", "cut.dcm"),
    ]


def test_zip_members_are_ingested_and_bad_members_quarantined(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    study = generate_uid()
    archive = settings.inbox / "study.zip"
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/1.dcm", dicom_bytes(study_uid=study))
        zf.writestr("a/2.dcm", dicom_bytes(study_uid=study))
        zf.writestr("a/readme.txt", b"hello")

    report = watch_once(settings, session_factory, store, now=LATER)

    assert (report.stored, report.quarantined) == (2, 1) and report.study_uids == {study}
    assert not archive.exists()
    assert (settings.quarantine / "study.zip_a_readme.txt.reason.json").exists()
    assert _rejections(session_factory) == [("folder", "not-dicom", "study.zip_a_readme.txt")]


def test_unsafe_archives_are_quarantined_whole(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    settings.inbox.mkdir(parents=True)
    with zipfile.ZipFile(settings.inbox / "slip.zip", "w") as zf:
        zf.writestr("../../etc/evil.dcm", dicom_bytes())
    with zipfile.ZipFile(settings.inbox / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.dcm", b"\0" * 2_000_000)  # deflates to ~2 kB
    _drop(settings, "broken.zip", b"PK\x03\x04" + b"\0" * 100)
    small = settings.model_copy(update={"max_archive_bytes": 1_000_000})

    report = watch_once(small, session_factory, store, now=LATER)

    assert dict(report.reasons) == {"unsafe-archive": 1, "archive-too-large": 1, "not-dicom": 1}
    assert _instances(session_factory) == 0
    assert not (settings.data_dir.parent / "etc").exists()
    assert list(settings.inbox.iterdir()) == []
    assert (settings.quarantine / "slip.zip").exists()
    assert (settings.quarantine / "bomb.zip.reason.json").exists()


def test_watch_loop_runs_its_hook_after_each_pass(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    fast = settings.model_copy(update={"watch_settle_seconds": 0, "watch_interval_seconds": 0.01})
    _drop(fast, "one.dcm", dicom_bytes())
    calls: list[int] = []
    watch_forever(fast, session_factory, store, lambda: calls.append(1), passes=2)
    assert calls == [1, 1] and _instances(session_factory) == 1


def test_ingest_command_records_rejections(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "x.dcm").write_bytes(b"garbage")
    ingest.ingest_files(
        ingest.find_files(folder), settings=settings, session_factory=session_factory, store=store
    )
    assert _rejections(session_factory) == [("ingest", "not-dicom", None)]


def test_status_counts_quarantined_files_by_reason(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    from radflow.services.status import platform_status

    _drop(settings, "a.txt", b"nope")
    _drop(settings, "b.txt", b"nope either")
    watch_once(settings, session_factory, store, now=LATER)
    with session_factory() as session:
        status = platform_status(session)
    assert status["rejections"] == {"folder": {"not-dicom": 2}}
    assert status["stable_studies"] == 0
