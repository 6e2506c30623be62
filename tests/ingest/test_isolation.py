"""No single file stops ingest: whatever one raises, it is set aside with a reason and the next
goes on; outages alone propagate, refusing nothing. On both backends."""

from __future__ import annotations

import dataclasses
import logging
import struct
import zlib
from pathlib import Path

import pytest
from bad_inputs import failing_unforeseen
from factories import dicom_bytes
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from radflow import ingest
from radflow.db import Instance, Rejection, make_sessionmaker
from radflow.dicom.instance import InstanceHeader, read_header
from radflow.errors import InvalidInstance
from radflow.ingest.receiver.indexer import UNHASHED
from radflow.outages import is_outage
from radflow.settings import Settings
from radflow.store import ObjectStore

# radflow.dicom.instance reads these with a specific reason (a deflated body that does not
# inflate, a value whose length its VR cannot hold); whatever the reason, each is refused alone.
REFUSED_READING = {"unprocessable", "unreadable", "bad-dimensions"}


def _count(session_factory: sessionmaker[Session], model: type) -> int:
    with session_factory() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def _rejections(session_factory: sessionmaker[Session]) -> list[tuple[str, str, str | None]]:
    with session_factory() as session:
        rows = session.scalars(select(Rejection).order_by(Rejection.id)).all()
        return [(r.source, r.reason, r.origin) for r in rows]


def test_files_that_fail_unforeseen_are_rejected_and_the_others_ingested(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a-good.dcm").write_bytes(dicom_bytes())
    for name, data in failing_unforeseen().items():
        (folder / f"b-{name}").write_bytes(data)
    (folder / "c-good.dcm").write_bytes(dicom_bytes())

    report = ingest.ingest_files(
        ingest.find_files(folder), settings=settings, session_factory=session_factory, store=store
    )

    assert report.stored == 2 and _count(session_factory, Instance) == 2
    refused = {Path(path).name: text.split(":")[0] for path, text in report.rejected.items()}
    assert set(refused) == {"b-deflate.dcm", "b-vr.dcm", "b-odd.dcm"}
    assert set(refused.values()) <= REFUSED_READING
    assert sorted(_rejections(session_factory)) == sorted(
        ("ingest", reason, name) for name, reason in refused.items()
    )
    assert "stored 2, duplicates 0, rejected 3" in report.summary()


def _fail(data: bytes) -> None:
    zlib.decompress(data)


def test_an_unforeseen_failure_logs_its_traceback_once(caplog: pytest.LogCaptureFixture) -> None:
    def raised(call: object, *args: object) -> Exception:
        try:
            call(*args)  # type: ignore[operator]
        except Exception as exc:
            return exc
        raise AssertionError("expected a failure")

    caplog.set_level(logging.ERROR, logger="radflow.ingest.index")
    same_place = [raised(_fail, b"not zlib %d" % n) for n in range(3)]
    elsewhere = raised(struct.unpack, "<I", b"")

    refusals = [ingest.refusal(exc, f"{n}.dcm") for n, exc in enumerate([*same_place, elsewhere])]

    assert {r.reason for r in refusals} == {"unprocessable"}
    assert "0.dcm: processing failed with error: Error -3" in str(refusals[0])
    tracebacks = [r for r in caplog.records if r.exc_info]
    # One per distinct failure (type and place), not one per file: 4 files, 2 tracebacks.
    assert len(caplog.records) == 4 and len(tracebacks) == 2
    assert [r.exc_info[0] for r in tracebacks if r.exc_info] == [zlib.error, struct.error]
    invalid = InvalidInstance("not-dicom", "x")
    assert ingest.refusal(invalid, "x.dcm") is invalid and len(caplog.records) == 4


def _headers(folder: Path, count: int) -> list[tuple[Path, InstanceHeader]]:
    folder.mkdir(parents=True)
    study = generate_uid()
    items = []
    for n in range(count):
        path = folder / f"{n}.dcm"
        path.write_bytes(dicom_bytes(study_uid=study))
        items.append((path, read_header(path, 10**8)))
    return items


def test_a_batch_failing_for_one_file_is_split_and_the_others_commit(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    items = _headers(tmp_path / "spool", 7)
    # A header the receiver submitted without its digest (a bug upstream): no object key can
    # be made for it, and the batch's write fails with a ValueError nobody foresaw.
    items[4] = (items[4][0], dataclasses.replace(items[4][1], sha256=UNHASHED))

    report = ingest.ingest_batch(
        items, settings=settings, session_factory=session_factory, store=store, immutable=True
    )

    assert (report.stored, report.duplicates, list(report.rejected)) == (6, 0, [str(items[4][0])])
    assert report.reasons == {"unprocessable": 1}
    assert "ValueError" in report.rejected[str(items[4][0])]
    assert _count(session_factory, Instance) == 6
    assert len(list(store.list("originals/"))) == 6
    # Logged (with its traceback the first time this process meets this failure).
    assert any("4.dcm could not be processed" in r.getMessage() for r in caplog.records)


def _unreachable(settings: Settings, tmp_path: Path) -> sessionmaker[Session]:
    """Sessions on a database that cannot be reached: the server or the file is not there."""
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        (tmp_path / "not-a-folder").write_text("")
        url = url.set(database=str(tmp_path / "not-a-folder" / "radflow.db"))
    else:
        url = url.set(database="no_such_database")
    return make_sessionmaker(create_engine(url))


def test_an_outage_propagates_and_refuses_nothing(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    items = _headers(tmp_path / "spool", 3)
    down = _unreachable(settings, tmp_path)

    with pytest.raises(OperationalError) as batch:
        ingest.ingest_batch(items, settings=settings, session_factory=down, store=store)
    with pytest.raises(OperationalError) as files:
        ingest.ingest_files(
            [path for path, _ in items], settings=settings, session_factory=down, store=store
        )

    assert is_outage(batch.value) and is_outage(files.value)
    assert _count(session_factory, Rejection) == 0
    assert all(path.exists() for path, _ in items)  # the caller still has every file
