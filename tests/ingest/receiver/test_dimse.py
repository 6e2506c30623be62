"""The receiver's C-STORE fast path sends and spools exactly what pynetdicom itself would."""

from __future__ import annotations

import hashlib
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from factories import dicom_bytes
from peers import storescu
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, build_context
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu_primitives import P_DATA
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import Instance
from radflow.ingest.receiver import FAILURE_STATUS, Receiver
from radflow.ingest.receiver.dimse import (
    ReceiverDIMSE,
    decode_command_set,
    encode_file_meta,
    encode_store_response,
    store_request,
)
from radflow.ingest.receiver.spool import IncomingFiles
from radflow.ingest.receiver.statuses import SUCCESS, UNKNOWN_REASON_STATUS
from radflow.store import ObjectStore

CT = "1.2.840.10008.5.1.4.1.1.2"
# Odd and even lengths: UI values are padded to an even length.
UIDS = ["1.2.3.4", "1.2.3.45", "1.2.826.0.1.3680043.8.498." + "1" * 36]


def _pynetdicom_response(message_id: int, sop_instance: str, status: int) -> list[bytes]:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = CT
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    return [p.presentation_data_value_list[0][1] for p in message.encode_msg(1, 16384)]


@pytest.mark.parametrize("status", [SUCCESS, UNKNOWN_REASON_STATUS, *FAILURE_STATUS.values()])
@pytest.mark.parametrize("sop_instance", UIDS)
def test_response_bytes_equal_pynetdicoms(status: int, sop_instance: str) -> None:
    for message_id in (1, 0xFFFF):
        ours = encode_store_response(message_id, CT, sop_instance, status)
        assert _pynetdicom_response(message_id, sop_instance, status) == [b"\x03" + ours]


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, "1.2.840.10008.1.2.4.50"]
)
@pytest.mark.parametrize("sop_instance", UIDS)
def test_file_meta_bytes_equal_pynetdicoms(syntax: str, sop_instance: str) -> None:
    # What pynetdicom writes at the start of a chunked dataset's file (dimse_messages.py).
    expected = DicomBytesIO()
    expected.write(b"\x00" * 128 + b"DICM")
    meta = create_file_meta(
        sop_class_uid=UID(CT), sop_instance_uid=UID(sop_instance), transfer_syntax=UID(syntax)
    )
    write_file_meta_info(expected, meta)
    assert encode_file_meta(CT, sop_instance, syntax) == expected.getvalue()


def _store_rq(sop_instance: str, dataset: bytes, max_pdu: int, **extra: object) -> list[P_DATA]:
    """pynetdicom's own encoding of a C-STORE-RQ, as the P-DATA primitives a peer sends."""
    request = C_STORE()
    request.MessageID = 12
    request.AffectedSOPClassUID = CT
    request.AffectedSOPInstanceUID = sop_instance
    request.Priority = 2
    for name, value in extra.items():
        setattr(request, name, value)
    request.DataSet = io.BytesIO(dataset)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return list(message.encode_msg(1, max_pdu))


def test_request_command_set_is_read_like_pynetdicom() -> None:
    command = _store_rq("1.2.3.45", b"\x00" * 10, 16384)[0].presentation_data_value_list[0][1]
    request = store_request(decode_command_set(command[1:]))
    assert request is not None
    assert (request.MessageID, request.Priority) == (12, 2)
    assert (request.AffectedSOPClassUID, request.AffectedSOPInstanceUID) == (CT, "1.2.3.45")
    # Elements the fast path does not handle are left to pynetdicom.
    moved = _store_rq("1.2.3.45", b"\x00", 16384, MoveOriginatorApplicationEntityTitle="PACS")
    assert (
        store_request(decode_command_set(moved[0].presentation_data_value_list[0][1][1:])) is None
    )
    with pytest.raises(ValueError):
        decode_command_set(command[1:-3])


@pytest.fixture
def association() -> Iterator[Association]:
    assoc = Association(AE(), MODE_ACCEPTOR)
    context = build_context(CT, ExplicitVRLittleEndian)
    context.context_id = 1
    assoc._accepted_cx[1] = context
    yield assoc


def _received(provider: DIMSEServiceProvider, pdatas: list[P_DATA]) -> tuple[C_STORE, bytes]:
    for pdata in pdatas:
        provider.receive_primitive(pdata)
    context_id, request = provider.get_msg(block=False)
    assert context_id == 1 and isinstance(request, C_STORE)
    path = request._dataset_path
    assert isinstance(path, Path)
    request._dataset_file.close()  # type: ignore[union-attr]
    data = path.read_bytes()
    path.unlink()
    return request, data


@pytest.mark.parametrize("max_pdu", [0, 4096, 1 << 20])
def test_dataset_split_across_many_pdvs_is_spooled_as_pynetdicom_would(
    association: Association, tmp_path: Path, max_pdu: int
) -> None:
    dataset = bytes(range(256)) * 2000 + b"\x01"  # odd length: nothing is padded on the way
    pdatas = _store_rq("1.2.3.45", dataset, max_pdu)
    assert max_pdu != 4096 or len(pdatas) > 100
    ours, our_file = _received(ReceiverDIMSE(association, IncomingFiles(tmp_path)), pdatas)

    chunked, tempdir = _config.STORE_RECV_CHUNKED_DATASET, tempfile.tempdir
    _config.STORE_RECV_CHUNKED_DATASET, tempfile.tempdir = True, str(tmp_path)
    try:
        theirs, their_file = _received(DIMSEServiceProvider(association), pdatas)
    finally:
        _config.STORE_RECV_CHUNKED_DATASET, tempfile.tempdir = chunked, tempdir
    assert our_file == their_file
    assert our_file.endswith(dataset)
    for name in ("MessageID", "Priority", "AffectedSOPClassUID", "AffectedSOPInstanceUID"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours._context_id == theirs._context_id == 1
    assert not list(tmp_path.iterdir())  # nothing left behind


def test_other_messages_go_to_pynetdicom(association: Association, tmp_path: Path) -> None:
    request = C_ECHO()
    request.MessageID = 3
    request.AffectedSOPClassUID = "1.2.840.10008.1.1"
    echo = C_ECHO_RQ()
    echo.primitive_to_message(request)
    provider = ReceiverDIMSE(association, IncomingFiles(tmp_path))
    for pdata in echo.encode_msg(1, 16384):
        provider.receive_primitive(pdata)
    _, received = provider.get_msg(block=False)
    assert isinstance(received, C_ECHO) and received.MessageID == 3


def test_storescu_with_small_pdus_is_stored_byte_for_byte(
    receiver: Receiver,
    tmp_path: Path,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
) -> None:
    sent = tmp_path / "ct.dcm"
    sent.write_bytes(dicom_bytes((np.arange(256 * 256, dtype=np.uint16) % 4096).reshape(256, 256)))
    # 4 KiB PDUs: the 128 KiB dataset arrives in some 30 P-DATA PDUs, one PDV each.
    result = storescu(receiver.port, [sent], "--max-send-pdu", "4096")
    assert result.returncode == 0, result.stderr
    assert receiver.wait_indexed(30)
    original = pydicom.dcmread(sent)
    with session_factory() as session:
        instance = session.scalars(select(Instance)).one()
    stored = store.get_bytes(instance.object_key)
    meta = encode_file_meta(
        str(original.SOPClassUID),
        str(original.SOPInstanceUID),
        str(original.file_meta.TransferSyntaxUID),
    )
    raw = sent.read_bytes()
    dataset_start = 132 + 12 + int.from_bytes(raw[140:144], "little")
    assert stored == meta + raw[dataset_start:]
    # Hashed by the indexer, after the response: the digest of exactly the bytes stored.
    assert instance.sha256 == hashlib.sha256(stored).hexdigest()
