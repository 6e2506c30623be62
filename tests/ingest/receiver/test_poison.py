"""No single instance stops the receiver: refused ones get a reason, poison ones are set aside
with a reason, and the instance sent right after each is indexed as usual."""

from __future__ import annotations

import logging
import random
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from factories import dicom_bytes
from malformed import POISON, REFUSED
from raw import send_store, split_part10
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from waiting import leftovers

from radflow.db import Instance, Rejection
from radflow.dicom.instance import read_header
from radflow.errors import InvalidInstance
from radflow.ingest.receiver import FAILURE_STATUS, Receiver, Spool, failure_status
from radflow.ingest.receiver.counters import ReceiverCounters
from radflow.ingest.receiver.dimse import encode_file_meta
from radflow.ingest.receiver.indexer import Indexer
from radflow.settings import Settings
from radflow.store import ObjectStore

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the bad files


def _made(make: Callable[[], bytes]) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make()


def _indexed(session_factory: sessionmaker[Session], uid: str) -> int:
    with session_factory() as session:
        query = select(func.count()).where(Instance.sop_instance_uid == uid)
        return int(session.scalar(query.select_from(Instance)) or 0)


def _rejections(session_factory: sessionmaker[Session], **where: str) -> list[Rejection]:
    with session_factory() as session:
        query = select(Rejection)
        for column, value in where.items():
            query = query.where(getattr(Rejection, column) == value)
        return list(session.scalars(query))


def _set_aside(session_factory: sessionmaker[Session], uid: str) -> list[Rejection]:
    with session_factory() as session:
        query = select(Rejection).where(Rejection.quarantine_key.contains(uid))
        return list(session.scalars(query))


def test_poison_instances_never_stop_the_indexer(
    receiver: Receiver, session_factory: sessionmaker[Session]
) -> None:
    """Values the header check passes but the index or the database cannot take (a 20-digit
    Instance Number, an integer over the column, a NUL in text on PostgreSQL) are acknowledged;
    each is then indexed or kept in spool/rejected with a reason, never retried forever, and the
    valid instance sent right after each is indexed as usual."""
    for name, make in POISON.items():
        poison, good = _made(make), dicom_bytes()
        assert send_store(receiver.port, poison) == 0x0000, name
        assert send_store(receiver.port, good) == 0x0000, name
        assert receiver.wait_indexed(30), f"indexing stalled after {name}"
        assert receiver.indexer.alive, name
        assert _indexed(session_factory, split_part10(good)[1]) == 1, name
        uid = split_part10(poison)[1]
        kept = _set_aside(session_factory, uid)
        assert _indexed(session_factory, uid) + len(kept) == 1, name
        for row in kept:
            assert (receiver.spool.rejected / Path(row.quarantine_key or "").name).exists()
    assert not list(receiver.spool.ready.iterdir())


def test_files_that_break_the_parser_are_refused_with_a_reason_and_never_come_back(
    start_receiver: Callable[..., Receiver], session_factory: sessionmaker[Session]
) -> None:
    """Sequences nested 600 deep, deflated garbage, a deflate stream or a nested sequence cut
    short raise RecursionError, zlib.error or struct.error in pydicom: each gets a failure
    status that names a reason (not pynetdicom's generic 0xC211), a Rejection row, and its file
    is gone before the status is sent, so a restart never hands it to the indexer."""
    receiver = start_receiver()
    refused_statuses = {*FAILURE_STATUS.values(), 0xC0FF}
    for name, make in REFUSED.items():
        status = send_store(receiver.port, _made(make), calling=name[:16])
        assert status in refused_statuses, (name, status)
        (row,) = _rejections(session_factory, origin=name[:16])
        assert failure_status(row.reason) == status, name
        assert not leftovers(receiver.spool), name
        assert not list(receiver.spool.ready.iterdir()), name
    spool = receiver.spool.root
    receiver.stop()

    again = start_receiver(spool_dir=spool)
    good = dicom_bytes()
    assert send_store(again.port, good) == 0x0000
    assert again.wait_indexed(30)
    assert again.indexer.alive
    assert _indexed(session_factory, split_part10(good)[1]) == 1
    assert len(_rejections(session_factory)) == len(REFUSED)  # none refused a second time


def test_wrong_bytes_get_the_reason_read_header_gives(
    receiver: Receiver, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """Text, a PNG, random bytes as a data set: the sender gets the status of the reason
    radflow.dicom.instance.read_header finds in the file the receiver writes, unmasked."""
    good = dicom_bytes()
    sop_class, sop_instance, syntax, _ = split_part10(good)
    noise = random.Random(17).randbytes  # the same bytes every run
    png = b"\x89PNG\r\n\x1a\n" + noise(600)
    for name, body in {
        "text": b"Patient: Doe^John\nStudy: chest\n" * 20,
        "png": png,
        "random": noise(2048),
    }.items():
        written = tmp_path / f"{name}.dcm"
        written.write_bytes(encode_file_meta(sop_class, sop_instance, syntax) + body)
        with pytest.raises(InvalidInstance) as raised:
            read_header(written, 10**9)
        status = send_store(receiver.port, good, dataset=body, calling=name)
        assert status == failure_status(raised.value.reason), name
        assert [r.reason for r in _rejections(session_factory, origin=name)] == [
            raised.value.reason
        ]


@pytest.mark.parametrize("settings", ["sqlite-local", "postgres-s3"], indirect=True)
def test_files_left_in_the_spool_that_cannot_be_indexed_are_set_aside_at_restart(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What a crash leaves in spool/ready is read again at the next start: a file pydicom cannot
    parse (received whole just before a crash that came before its refusal) goes to
    spool/rejected with a Rejection row and its traceback logged once; the rest is indexed."""
    spool = Spool(settings.spool).open()
    bad = {name: _made(make) for name, make in REFUSED.items()}
    good = [dicom_bytes() for _ in range(3)]
    for name, data in [*bad.items(), *((f"good-{i}", g) for i, g in enumerate(good))]:
        (spool.ready / f"{name}.0123456789ab.dcm").write_bytes(data)
    counters = ReceiverCounters(spool.stats_path)
    indexer = Indexer(
        spool, settings=settings, session_factory=session_factory, store=store, counters=counters
    )
    with caplog.at_level(logging.WARNING, logger="radflow.ingest.receiver"):
        indexer.start()
        try:
            assert indexer.wait_idle(30)
        finally:
            indexer.stop()
            spool.close()
    assert indexer.failure is None
    for data in good:
        assert _indexed(session_factory, split_part10(data)[1]) == 1
    kept = {
        Path(row.quarantine_key or "").name.split(".")[0]: row
        for row in _rejections(session_factory)
    }
    assert kept.keys() == bad.keys()
    assert sorted(p.name.split(".")[0] for p in spool.rejected.iterdir()) == sorted(bad)
    tracebacks = [r for r in caplog.records if r.exc_info]
    distinct = {(type(r.exc_info[1]), str(r.exc_info[1])) for r in tracebacks if r.exc_info}
    assert len(tracebacks) == len(distinct)  # one traceback per distinct failure
    assert counters.health()["errors"] >= len(tracebacks)


def test_an_outage_is_retried_and_never_rejects(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    small_disk: Callable[[int], Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The object store's disk full (ENOSPC, an outage): the batch waits and is retried with a
    backoff, one log line per try, nothing is rejected; once there is room, all is indexed."""
    from radflow.store import open_store

    disk = small_disk(1 << 20)
    filler = disk / "filler"
    filler.write_bytes(b"\0" * ((1 << 20) - 16 * 1024))
    local = open_store(settings.model_copy(update={"store_url": str(disk / "objects")}))
    spool = Spool(settings.spool).open()
    files = [dicom_bytes() for _ in range(4)]
    for i, data in enumerate(files):
        (spool.ready / f"{i}.0123456789ab.dcm").write_bytes(data)
    counters = ReceiverCounters(spool.stats_path)
    indexer = Indexer(
        spool, settings=settings, session_factory=session_factory, store=local, counters=counters
    )
    with caplog.at_level(logging.WARNING, logger="radflow.ingest.receiver"):
        indexer.start()
        try:
            deadline = time.monotonic() + 10
            while counters.snapshot()["index_retries"] < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert counters.snapshot()["index_retries"] >= 2
            assert len(list(spool.ready.iterdir())) == len(files)  # kept, not rejected
            filler.unlink()
            assert indexer.wait_idle(30)
        finally:
            indexer.stop()
            spool.close()
    assert not _rejections(session_factory)
    for data in files:
        assert _indexed(session_factory, split_part10(data)[1]) == 1
    retries = [r for r in caplog.records if "retrying in" in r.getMessage()]
    assert retries and not any(r.exc_info for r in retries)  # one line per try
    shutil.rmtree(disk / "objects", ignore_errors=True)
