"""The DICOM receiver against DCMTK echoscu/storescu: store, index, refuse bad input, allow-list."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from factories import dicom_bytes
from peers import echoscu, storescu
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from demo.synthetic import write_cxr_studies
from radflow.db import Instance, Rejection, Study
from radflow.ingest.receiver import FAILURE_STATUS, Receiver
from radflow.services.status import platform_status
from radflow.settings import Settings
from radflow.store import ObjectStore


def test_echo(receiver: Receiver) -> None:
    result = echoscu(receiver.port)
    assert result.returncode == 0, result.stderr


def test_store_index_and_resend_once(
    receiver: Receiver,
    tmp_path: Path,
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
) -> None:
    studies = write_cxr_studies(tmp_path / "studies", 4, size=64)
    files = [s.path for s in studies]

    result = storescu(receiver.port, files)
    assert result.returncode == 0, result.stderr
    assert receiver.wait_indexed(60)

    with session_factory() as session:
        instances = session.scalars(select(Instance)).all()
        assert {i.sop_instance_uid for i in instances} == {s.sop_instance_uid for s in studies}
        for instance in instances:
            assert store.exists(instance.object_key)
    assert not list((settings.spool / "ready").iterdir())

    # The same study sent again is acknowledged and stored once.
    again = storescu(receiver.port, files)
    assert again.returncode == 0, again.stderr
    assert receiver.wait_indexed(60)
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == len(studies)
        assert session.scalar(select(func.count()).select_from(Study)) == len(studies)
    counters = receiver.counters.snapshot()
    assert counters["received"] == counters["spooled"] == 2 * len(studies)
    assert counters["indexed"] == len(studies)
    assert counters["duplicates"] == len(studies)


def _bad_files(folder: Path) -> dict[str, Path]:
    """One file per refusal reason that DCMTK storescu still agrees to send."""
    folder.mkdir()
    cases: dict[str, Path] = {}

    def write(reason: str, ds: pydicom.Dataset) -> None:
        path = folder / f"{reason}.dcm"
        ds.save_as(path, enforce_file_format=True)
        cases[reason] = path

    def good() -> pydicom.Dataset:
        return pydicom.dcmread(io.BytesIO(dicom_bytes()))

    ds = good()
    del ds.StudyInstanceUID
    write("missing-uid", ds)
    ds = good()
    ds.SeriesInstanceUID = "1.2.3." + "4" * 70  # longer than the 64 characters DICOM allows
    write("invalid-uid", ds)
    ds = good()
    del ds.PixelData
    write("no-pixel-data", ds)
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((300, 300), np.uint16))))
    write("too-large", ds)
    return cases


# The over-long UID and the garbage data set are the point of this test.
@pytest.mark.filterwarnings("ignore:The value length", "ignore:Expected explicit VR")
def test_bad_input_gets_specific_status_and_rejection(
    start_receiver: Callable[..., Receiver],
    tmp_path: Path,
    session_factory: sessionmaker[Session],
) -> None:
    receiver = start_receiver(max_pixels=256 * 256)
    for reason, path in _bad_files(tmp_path / "bad").items():
        result = storescu(receiver.port, [path], "-d")  # -d prints the response status
        status = f"0x{FAILURE_STATUS[reason]:04x}"
        assert status in (result.stdout + result.stderr).lower(), (reason, result.stderr)

    # Bytes storescu would refuse to send: a raw pynetdicom association sends them as they are.
    truncated = dicom_bytes(np.ones((128, 128), np.uint16))[:-5000]
    assert _send_raw(receiver.port, truncated) == FAILURE_STATUS["truncated"]
    # pydicom reads tolerantly: which rule garbage breaks first is its business, not ours;
    # what matters is a specific failure status rather than a success or an aborted association.
    garbage = _with_garbage_dataset(dicom_bytes())
    assert _send_raw(receiver.port, garbage) in FAILURE_STATUS.values()

    # The receiver keeps serving after all of that.
    ok = storescu(receiver.port, [_write(tmp_path / "ok.dcm", dicom_bytes())])
    assert ok.returncode == 0, ok.stderr
    assert receiver.wait_indexed(30)
    with session_factory() as session:
        reasons = dict(
            session.execute(
                select(Rejection.reason, func.count())
                .where(Rejection.source == "receiver", Rejection.origin.is_not(None))
                .group_by(Rejection.reason)
            ).all()
        )
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
    assert reasons.keys() >= {"missing-uid", "invalid-uid", "no-pixel-data", "too-large"}
    assert reasons["truncated"] == 1
    assert sum(reasons.values()) == 6  # four via storescu, truncated, garbage
    # Nothing refused was left in the spool, and the messages carry no patient identifiers.
    assert not list(receiver.spool.ready.iterdir())
    with session_factory() as session:
        messages = " ".join(session.scalars(select(Rejection.message)))
    assert "TEST-PATIENT" not in messages and "Test^Patient" not in messages


def test_status_shows_receiver_counters(
    receiver: Receiver,
    tmp_path: Path,
    settings: Settings,
    session_factory: sessionmaker[Session],
) -> None:
    files = [_write(tmp_path / f"{i}.dcm", dicom_bytes()) for i in range(3)]
    assert storescu(receiver.port, files).returncode == 0
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes()))
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm", enforce_file_format=True)
    storescu(receiver.port, [tmp_path / "nopixels.dcm"])
    assert receiver.wait_indexed(30)
    receiver.counters.save(force=True)
    with session_factory() as session:
        status = platform_status(session, settings)
    json.dumps(status)  # what `radflow status --json` prints
    shown = status["receiver"]
    assert {k: v for k, v in shown.items() if k in ("received", "spooled", "indexed")} == {
        "received": 4,
        "spooled": 3,
        "indexed": 3,
    }
    assert shown["duplicates"] == shown["spool_waiting"] == 0
    assert shown["rejected"] == {"no-pixel-data": 1}
    assert shown["oldest_waiting_seconds"] is None
    assert shown["accepting"] and shown["not_accepting_because"] is None
    assert shown["spool_free_bytes"] > 0
    (indexer,) = shown["indexers"].values()
    assert indexer["alive"] and indexer["state"] == "running"
    assert indexer["last_batch_at"] is not None and indexer["errors"] == 0


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_calling_ae_allow_list(
    start_receiver: Callable[..., Receiver], session_factory: sessionmaker[Session]
) -> None:
    receiver = start_receiver(allowed_calling_aets=["CT_SCANNER"])
    refused = echoscu(receiver.port, aet="INTRUDER")
    assert refused.returncode != 0
    assert "rejected" in (refused.stdout + refused.stderr).lower()
    assert echoscu(receiver.port, aet="CT_SCANNER").returncode == 0
    with session_factory() as session:
        rows = session.scalars(select(Rejection)).all()
    assert [(r.reason, r.origin) for r in rows] == [("calling-aet-not-allowed", "INTRUDER")]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _with_garbage_dataset(data: bytes) -> bytes:
    """Valid file meta, then bytes that are no DICOM data set."""
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
    return data[:meta_end] + b"\x7f\xe0\x10\x00garbage" * 200


def _send_raw(port: int, data: bytes) -> int:
    """Send a Part 10 file's data set bytes without decoding them; return the C-STORE status."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    meta = ds.file_meta
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    path = Path(f"/tmp/radflow-raw-{generate_uid()}.dcm")
    path.write_bytes(data)
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="RADFLOW")
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
        return int(status.Status)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        path.unlink()
