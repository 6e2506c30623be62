"""Copies of one instance in other bytes: the same image is a duplicate (the first copy kept,
in arrival order), anything else a uid-conflict naming both digests. On both backends."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from bad_inputs import changed, reencoded
from factories import dicom_bytes
from pydicom.uid import JPEG2000, generate_uid
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from radflow import ingest
from radflow.db import Instance
from radflow.dicom.instance import read_header
from radflow.settings import Settings
from radflow.store import ObjectStore


def _uids() -> dict[str, str]:
    return {
        "study_uid": generate_uid(),
        "series_uid": generate_uid(),
        "sop_instance_uid": generate_uid(),
    }


def _ingest(folder: Path, files: dict[str, bytes], settings, session_factory, store):  # type: ignore[no-untyped-def]
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return ingest.ingest_files(
        ingest.find_files(folder), settings=settings, session_factory=session_factory, store=store
    )


def _kept(session_factory: sessionmaker[Session], store: ObjectStore, uid: str) -> bytes:
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
        row = session.scalar(select(Instance).where(Instance.sop_instance_uid == uid))
        assert row is not None
        return store.get_bytes(row.object_key)


def test_other_encodings_of_a_stored_instance_are_duplicates(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    uids = _uids()
    original = dicom_bytes(**uids)
    copies = reencoded(original)
    first = _ingest(tmp_path / "a", {"x.dcm": original}, settings, session_factory, store)

    again = _ingest(tmp_path / "b", copies, settings, session_factory, store)

    assert first.stored == 1
    assert (again.stored, again.duplicates, again.rejected) == (0, len(copies), {})
    assert _kept(session_factory, store, uids["sop_instance_uid"]) == original
    assert len(list(store.list("originals/"))) == 1


def test_the_first_copy_to_arrive_is_kept(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    uids = _uids()
    original = dicom_bytes(**uids)
    rle = reencoded(original)["rle.dcm"]

    # In one run the files arrive in name order: the RLE copy first.
    report = _ingest(
        tmp_path / "a",
        {"1-rle.dcm": rle, "2-explicit.dcm": original},
        settings,
        session_factory,
        store,
    )
    # In one batch, in the order given.
    folder = tmp_path / "b"
    folder.mkdir()
    other = _uids()
    second = dicom_bytes(**other)
    items = []
    for name, data in (("0.dcm", reencoded(second)["implicit.dcm"]), ("1.dcm", second)):
        (folder / name).write_bytes(data)
        items.append((folder / name, read_header(folder / name, 10**8)))
    batch = ingest.ingest_batch(
        items, settings=settings, session_factory=session_factory, store=store
    )

    assert (report.stored, report.duplicates, batch.stored, batch.duplicates) == (1, 1, 1, 1)
    with session_factory() as session:
        kept = dict(session.execute(select(Instance.sop_instance_uid, Instance.object_key)).all())
    assert store.get_bytes(kept[uids["sop_instance_uid"]]) == rle
    assert store.get_bytes(kept[other["sop_instance_uid"]]) == (folder / "0.dcm").read_bytes()


def _lossy(data: bytes) -> bytes:
    return changed(data, lambda ds: ds.compress(JPEG2000, j2k_cr=[40], generate_instance_uid=False))


@pytest.mark.parametrize(
    ("make", "difference"),
    [
        (lambda uids: dicom_bytes(np.ones((64, 64), np.uint16), **uids), "has other pixel data"),
        (lambda uids: _lossy(dicom_bytes(**uids)), "has other pixel data"),
        (
            lambda uids: dicom_bytes(**uids, patient_id="SOMEONE-ELSE"),
            "belongs to another patient",
        ),
        (
            lambda uids: dicom_bytes(**{**uids, "series_uid": generate_uid()}),
            "belongs to another series",
        ),
    ],
    ids=["pixels", "lossy", "patient", "series"],
)
def test_a_real_conflict_is_refused_naming_both_digests(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    tmp_path: Path,
    make,  # type: ignore[no-untyped-def]
    difference: str,
) -> None:
    uids = _uids()
    original = dicom_bytes(**uids)
    other = make(uids)
    assert pydicom.dcmread(io.BytesIO(other)).SOPInstanceUID == uids["sop_instance_uid"]
    _ingest(tmp_path / "a", {"x.dcm": original}, settings, session_factory, store)

    report = _ingest(tmp_path / "b", {"x.dcm": other}, settings, session_factory, store)

    message = report.rejected[str(tmp_path / "b" / "x.dcm")]
    assert message.startswith("uid-conflict: ") and difference in message
    assert hashlib.sha256(original).hexdigest() in message
    assert hashlib.sha256(other).hexdigest() in message
    assert _kept(session_factory, store, uids["sop_instance_uid"]) == original
    assert len(list(store.list("originals/"))) == 1
