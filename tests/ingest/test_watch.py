"""The watch folder on both backends: settled files in, bad ones quarantined with a reason."""

from __future__ import annotations

import json
import os
import resource
import signal
import time
import tracemalloc
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bad_inputs import changed, failing_unforeseen, zip_of_zeros
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

    dropped = archive.read_bytes()

    report = watch_once(settings, session_factory, store, now=LATER)

    assert (report.stored, report.quarantined) == (2, 1) and report.study_uids == {study}
    assert not archive.exists()
    # The archive is kept, not the member: what quarantine holds is what was dropped.
    reason = json.loads((settings.quarantine / "study.zip_a_readme.txt.reason.json").read_text())
    assert (reason["original_name"], reason["kept"]) == ("study.zip/a/readme.txt", "study.zip")
    assert (settings.quarantine / "study.zip").read_bytes() == dropped
    assert _rejections(session_factory) == [("folder", "not-dicom", "study.zip")]


def test_a_dicom_file_ending_like_a_zip_is_ingested_as_dicom(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    # Pixel data whose last 22 bytes read as a zip's end-of-central-directory record.
    end_record = b"PK\x05\x06" + bytes(18)
    data = changed(
        dicom_bytes(), lambda ds: setattr(ds, "PixelData", ds.PixelData[:-22] + end_record)
    )
    path = _drop(settings, "image.dcm", data)
    assert zipfile.is_zipfile(path)

    report = watch_once(settings, session_factory, store, now=LATER)

    assert (report.stored, report.quarantined) == (1, 0)


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


def test_an_entry_that_fails_unforeseen_is_quarantined_and_the_queue_goes_on(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    for name, data in failing_unforeseen().items():
        _drop(settings, f"a-{name}", data)
    # An archive of such members: each is refused on its own, the good one ingested.
    settings.inbox.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(settings.inbox / "b.zip", "w") as zf:
        for name, data in failing_unforeseen().items():
            zf.writestr(name, data)
        zf.writestr("good.dcm", dicom_bytes())
    _drop(settings, "c.dcm", dicom_bytes())
    # Not UTF-8: the name reaches Python with a lone surrogate, which no database stores.
    (settings.inbox / os.fsdecode(b"d-\xff.txt")).write_bytes(b"latin-1 name")

    report = watch_once(settings, session_factory, store, now=LATER)

    assert (report.stored, report.quarantined) == (2, 7)
    assert set(report.reasons) <= {"unprocessable", "unreadable", "not-dicom", "bad-dimensions"}
    assert list(settings.inbox.iterdir()) == []
    rejections = _rejections(session_factory)
    assert len(rejections) == 7
    # Members are refused on their own; their archive is kept once, never a member.
    assert [key for *_, key in rejections].count("b.zip") == 3
    assert sorted(p.name for p in settings.quarantine.glob("b.zip*")) == [
        "b.zip",
        *(f"b.zip_{name}.reason.json" for name in sorted(failing_unforeseen())),
    ]
    assert ("folder", "not-dicom", "d-_.txt") in rejections

    assert watch_once(settings, session_factory, store, now=LATER).quarantined == 0


def test_a_member_with_a_304_character_name_does_not_block_the_queue(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    long_dicom, long_text = "d" * 300 + ".dcm", "t" * 300 + ".txt"
    settings.inbox.mkdir(parents=True)
    with zipfile.ZipFile(settings.inbox / "a.zip", "w") as zf:
        zf.writestr(long_dicom, dicom_bytes())
        zf.writestr(long_text, b"notes")
        zf.writestr("short.dcm", dicom_bytes())
    _drop(settings, "b.dcm", dicom_bytes())

    report = watch_once(settings, session_factory, store, now=LATER)

    # The name is only a label: the DICOM member is ingested, the text one refused for what it is.
    assert (report.stored, report.quarantined, dict(report.reasons)) == (3, 1, {"not-dicom": 1})
    reason_files = [p for p in settings.quarantine.iterdir() if p.name.endswith(".reason.json")]
    (reason_file,) = reason_files
    reason = json.loads(reason_file.read_text())
    assert reason["original_name"] == f"a.zip/{long_text}" and reason["kept"] == "a.zip"
    assert len(reason_file.name) < 255
    assert list(settings.inbox.iterdir()) == []


def test_links_are_refused_without_reading_their_target(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    secret = outside / "secret.txt"
    secret.write_text("not for the quarantine")
    image = outside / "folder" / "image.dcm"
    image.write_bytes(dicom_bytes())
    settings.inbox.mkdir(parents=True)
    (settings.inbox / "secret.dcm").symlink_to(secret)
    (settings.inbox / "image.dcm").symlink_to(image)
    (settings.inbox / "folder").symlink_to(outside / "folder")
    (settings.inbox / "dangling.dcm").symlink_to(outside / "gone.dcm")

    report = watch_once(settings, session_factory, store, now=LATER)

    assert (report.stored, report.quarantined, dict(report.reasons)) == (0, 4, {"symlink": 4})
    assert _instances(session_factory) == 0
    assert list(settings.inbox.iterdir()) == []  # the links are gone, their targets untouched
    assert secret.read_text() == "not for the quarantine" and image.exists()
    kept = sorted(p.name for p in settings.quarantine.iterdir())
    assert kept == [
        f"{n}.reason.json" for n in ("dangling.dcm", "folder", "image.dcm", "secret.dcm")
    ]
    reason = json.loads((settings.quarantine / "secret.dcm.reason.json").read_text())
    assert str(secret) in reason["message"] and reason["kept"] is None
    assert "not for the quarantine" not in reason["message"]


@contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """No file this process writes may grow past ``limit`` bytes (write fails with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_zip_with_a_1_gib_member_is_kept_as_the_zip_and_never_inflated(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    settings.inbox.mkdir(parents=True)
    archive = settings.inbox / "bomb.zip"
    zip_of_zeros(archive, "zeros.dcm", 1 << 30)
    with zipfile.ZipFile(settings.inbox / "after.zip", "w") as zf:
        zf.writestr("image.dcm", dicom_bytes())
    size = archive.stat().st_size
    assert size < 2 << 20  # about 1 MiB

    tracemalloc.start()
    try:
        with _file_size_limit(16 << 20):  # a file of 1 GiB would fail to be written
            report = watch_once(settings, session_factory, store, now=LATER)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert (report.stored, report.quarantined, dict(report.reasons)) == (1, 1, {"not-dicom": 1})
    assert peak < 32 << 20
    quarantined = {p.name: p.stat().st_size for p in settings.quarantine.iterdir()}
    assert quarantined.pop("bomb.zip") == size  # the archive, not its inflated member
    assert list(quarantined) == ["bomb.zip_zeros.dcm.reason.json"]
    assert list((settings.data_dir / "tmp").iterdir()) == []
