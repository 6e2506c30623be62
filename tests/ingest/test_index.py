"""Ingest on both backends: stored once, indexed, and bad files rejected with a specific reason."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pydicom
import pytest
from factories import dicom_bytes
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, generate_uid
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from radflow import ingest
from radflow.db import Instance, Patient, Series, Study, StudyStatus, unit_of_work
from radflow.dicom.instance import InstanceHeader, read_header
from radflow.settings import Settings
from radflow.store import ObjectStore, keys


def _write(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path


def _ingest(folder: Path, settings: Settings, session_factory, store) -> ingest.IngestReport:  # type: ignore[no-untyped-def]
    return ingest.ingest_files(
        ingest.find_files(folder), settings=settings, session_factory=session_factory, store=store
    )


def _uids() -> dict[str, str]:
    """Fresh study, series and SOP instance UIDs, as dicom_bytes takes them."""
    return {
        "study_uid": generate_uid(),
        "series_uid": generate_uid(),
        "sop_instance_uid": generate_uid(),
    }


def _count(session_factory: sessionmaker[Session], model: type) -> int:
    with session_factory() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_ingest_stores_originals_and_indexes_them(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    study_uid, series_uid = generate_uid(), generate_uid()
    uids = [generate_uid() for _ in range(3)]
    folder = tmp_path / "in"
    for i, uid in enumerate(uids):
        _write(
            folder / "sub",
            f"{i}.dcm",
            dicom_bytes(
                study_uid=study_uid,
                series_uid=series_uid,
                sop_instance_uid=uid,
                patient_id="MRN-0042",
                accession="A1",
            ),
        )

    report = _ingest(folder, settings, session_factory, store)

    assert (report.stored, report.duplicates, report.rejected) == (3, 0, {})
    assert report.study_uids == {study_uid}
    for i, uid in enumerate(uids):
        sent = (folder / "sub" / f"{i}.dcm").read_bytes()
        digest = hashlib.sha256(sent).hexdigest()
        assert store.get_bytes(keys.original(study_uid, series_uid, uid, digest)) == sent
    with session_factory() as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        assert study is not None and study.status == StudyStatus.RECEIVING
        assert study.accession_number == "A1"
        assert len(study.series) == 1 and len(study.series[0].instances) == 3
        # The patient is kept only as a keyed pseudonym: the MRN is nowhere in the row.
        assert "MRN-0042" not in study.patient.pseudonym


def test_same_instance_twice_is_stored_once(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    data = dicom_bytes()
    _write(tmp_path / "a", "x.dcm", data)
    _write(tmp_path / "b", "copy-of-x.dcm", data)

    first = _ingest(tmp_path / "a", settings, session_factory, store)
    second = _ingest(tmp_path / "b", settings, session_factory, store)

    assert (first.stored, second.stored, second.duplicates) == (1, 0, 1)
    assert [_count(session_factory, m) for m in (Patient, Study, Series, Instance)] == [1, 1, 1, 1]
    assert len(list(store.list("originals/"))) == 1


def test_same_uid_with_different_content_is_rejected_not_overwritten(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    uids = _uids()
    original = dicom_bytes(**uids)
    _write(tmp_path / "a", "x.dcm", original)
    _write(tmp_path / "b", "x.dcm", dicom_bytes(np.zeros((64, 64), np.uint16), **uids))

    _ingest(tmp_path / "a", settings, session_factory, store)
    report = _ingest(tmp_path / "b", settings, session_factory, store)

    assert report.reasons == {"uid-conflict": 1}
    assert _stored_original(session_factory, store, uids["sop_instance_uid"]) == original
    assert len(list(store.list("originals/"))) == 1


def _stored_original(
    session_factory: sessionmaker[Session], store: ObjectStore, sop_instance_uid: str
) -> bytes:
    """The bytes the index row of ``sop_instance_uid`` points to (checked against its digest)."""
    with session_factory() as session:
        row = session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))
        assert row is not None
        data = store.get_bytes(row.object_key)
        assert hashlib.sha256(data).hexdigest() == row.sha256
        return data


class _RacingStore:
    """A store that lets ``rival()`` index its file in between a batch's lookup and its write:
    two writers of one SOP Instance UID at the same moment, deterministically."""

    def __init__(self, store: ObjectStore, rival: Callable[[], object]) -> None:
        self._store, self._rival = store, rival

    def put_files(self, *args: Any, **kwargs: Any) -> None:
        rival, self._rival = self._rival, lambda: None
        rival()
        self._store.put_files(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_writer_losing_a_race_for_a_uid_never_overwrites_the_winner(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    uids = _uids()
    winner = _headers(tmp_path / "a", [dicom_bytes(**uids)])
    loser = _headers(tmp_path / "b", [dicom_bytes(np.ones((64, 64), np.uint16), **uids)])

    def index_winner() -> None:
        report = ingest.ingest_batch(
            winner, settings=settings, session_factory=session_factory, store=store
        )
        assert report.stored == 1

    report = ingest.ingest_batch(
        loser,
        settings=settings,
        session_factory=session_factory,
        store=cast(ObjectStore, _RacingStore(store, index_winner)),
    )

    assert (report.stored, report.reasons) == (0, {"uid-conflict": 1})
    assert _stored_original(session_factory, store, uids["sop_instance_uid"]) == (
        winner[0][0].read_bytes()
    )
    assert len(list(store.list("originals/"))) == 1  # the loser's object was removed again


def _as_mpeg2(ds: pydicom.Dataset) -> None:
    """Relabel as MPEG-2 video, a syntax Radflow cannot decode (the frames stay encapsulated)."""
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    ds["PixelData"].VR = "OB"
    ds.PixelData = encapsulate([ds.PixelData])


def _bad_files(folder: Path) -> dict[str, str]:
    """One file per kind of bad input, and the reason each must be rejected with."""
    good = dicom_bytes()
    ds = pydicom.dcmread(io.BytesIO(good))

    def variant(change) -> bytes:  # type: ignore[no-untyped-def]
        copy = pydicom.dcmread(io.BytesIO(good))
        copy.SOPInstanceUID = generate_uid()
        copy.file_meta.MediaStorageSOPInstanceUID = copy.SOPInstanceUID
        change(copy)
        buffer = io.BytesIO()
        copy.save_as(buffer, enforce_file_format=False)
        return buffer.getvalue()

    cases = {
        "not-dicom": b"%PDF-1.4 this is a report, not an image" * 20,
        "truncated": good[: len(good) // 3],
        "unreadable": good[:200],
        "missing-uid": variant(lambda d: delattr(d, "StudyInstanceUID")),
        "invalid-uid": variant(lambda d: setattr(d, "SeriesInstanceUID", "1.2.3/../../etc")),
        "no-pixel-data": variant(lambda d: delattr(d, "PixelData")),
        "too-large": variant(lambda d: setattr(d, "NumberOfFrames", 100_000)),
        "unsupported-transfer-syntax": variant(_as_mpeg2),
    }
    assert ds.SOPInstanceUID
    for reason, data in cases.items():
        _write(folder, f"{reason}.dcm", data)
    _write(folder, "good.dcm", good)
    return {str(folder / f"{r}.dcm"): r for r in cases}


def test_bad_files_are_rejected_with_specific_reasons_and_good_ones_still_stored(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    settings.max_pixels = 64 * 64 * 1000
    expected = _bad_files(tmp_path / "in")

    report = _ingest(tmp_path / "in", settings, session_factory, store)

    assert report.stored == 1
    assert {path: reason.split(":")[0] for path, reason in report.rejected.items()} == expected
    assert _count(session_factory, Instance) == 1


def test_compressed_transfer_syntax_is_accepted(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes()))
    ds.compress(JPEG2000Lossless)
    path = tmp_path / "in" / "j2k.dcm"
    path.parent.mkdir()
    ds.save_as(path, enforce_file_format=True)

    report = _ingest(tmp_path / "in", settings, session_factory, store)

    assert report.stored == 1
    with session_factory() as session:
        assert session.scalar(select(Instance.transfer_syntax_uid)) == JPEG2000Lossless


def test_mark_stable_and_late_instance_reopens_study(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    study_uid = generate_uid()
    _write(tmp_path / "a", "1.dcm", dicom_bytes(study_uid=study_uid))
    _ingest(tmp_path / "a", settings, session_factory, store)
    with unit_of_work(session_factory) as session:
        assert ingest.mark_stable(session, [study_uid]) == 1
    _write(tmp_path / "b", "2.dcm", dicom_bytes(study_uid=study_uid))
    _ingest(tmp_path / "b", settings, session_factory, store)

    with session_factory() as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        assert study is not None and study.status == StudyStatus.RECEIVING
        assert sum(len(s.instances) for s in study.series) == 2


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a folder"):
        list(ingest.find_files(tmp_path / "nope"))


def _headers(folder: Path, datas: list[bytes]) -> list[tuple[Path, InstanceHeader]]:
    paths = [_write(folder, f"{n}.dcm", data) for n, data in enumerate(datas)]
    return [(p, read_header(p, 10**8)) for p in paths]


def test_a_batch_indexes_new_instances_once_and_counts_repeats_as_duplicates(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    study, series = generate_uid(), generate_uid()
    datas = [dicom_bytes(study_uid=study, series_uid=series) for _ in range(4)]
    first = ingest.ingest_batch(
        _headers(tmp_path / "a", datas[:2] + datas[:1]),  # one instance twice in the batch
        settings=settings,
        session_factory=session_factory,
        store=store,
        immutable=True,
    )
    second = ingest.ingest_batch(
        _headers(tmp_path / "b", datas),  # two already indexed, two new
        settings=settings,
        session_factory=session_factory,
        store=store,
    )
    assert (first.stored, first.duplicates, second.stored, second.duplicates) == (2, 1, 2, 2)
    assert [_count(session_factory, m) for m in (Patient, Study, Series, Instance)] == [1, 1, 1, 4]
    assert len(list(store.list("originals/"))) == 4


def test_a_conflict_in_a_batch_rejects_only_that_instance(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    uids = _uids()
    ingest.ingest_batch(
        _headers(tmp_path / "a", [dicom_bytes(**uids)]),
        settings=settings,
        session_factory=session_factory,
        store=store,
    )
    items = _headers(
        tmp_path / "b",
        [
            dicom_bytes(study_uid=uids["study_uid"]),
            dicom_bytes(np.ones((64, 64), np.uint16), **uids),
        ],
    )
    report = ingest.ingest_batch(
        items, settings=settings, session_factory=session_factory, store=store, immutable=True
    )
    assert (report.stored, report.reasons) == (1, {"uid-conflict": 1})
    assert list(report.rejected) == [str(items[1][0])]
    assert _count(session_factory, Instance) == 2
