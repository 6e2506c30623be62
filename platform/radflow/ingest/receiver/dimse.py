"""The receiver's C-STORE fast path: DIMSE for one message type, without pydicom datasets.

pynetdicom turns every DIMSE command set into a pydicom :class:`~pydicom.dataset.Dataset`: it
decodes each C-STORE-RQ into one, builds one for each C-STORE-RSP (and encodes it twice: once
for the group length, once to send), and writes the received dataset's file meta information
through pydicom into a :class:`~tempfile.NamedTemporaryFile` that it flushes after every PDV.
Profiled with ``benchmarks/ingest.py``, that is the largest part of the receiver's per-instance
Python time under the GIL, and a CT sender on one association waits for every response.

:class:`ReceiverDIMSE` is pynetdicom's own DIMSE provider, given to the receiver's associations
only (set by the fast path's request handler, radflow/ingest/receiver/transport.py; never a
global patch): it takes the common case itself and leaves everything else to pynetdicom,
unchanged.

- **C-STORE-RQ**, command set in one PDV, only the usual elements (:data:`STORE_RQ_TAGS`): the
  command set is read with :mod:`struct`, the request primitive is built directly and the
  dataset is streamed, one unbuffered ``write`` per PDV, into a file in the spool's
  ``incoming/`` folder (made ahead, after the previous response:
  :class:`radflow.ingest.receiver.spool.IncomingFiles`) after file meta information encoded here.
  The file is byte for byte what pynetdicom writes (tests/ingest/receiver/test_dimse.py compares
  both).
- **C-STORE-RSP** with a status only: its command set is encoded here, byte for byte what
  pynetdicom sends, and sent from the association's thread instead of being queued for the DUL
  thread's next 1 ms poll (:meth:`ReceiverDIMSE._send_now`).
- **No nap before serving a request**: the association's reactor waits for the next request
  on the message queue instead of napping 1 ms between polls (:meth:`ReceiverDIMSE.get_msg`).

Any other message (C-ECHO, a command set split across PDVs, Move Originator elements, a UID
pydicom would read as several values...) goes to pynetdicom as before. pynetdicom's standard
logging handlers for received and sent DIMSE messages are skipped only while their logger would
discard what they log anyway.

**The guard.** This replaces methods of pynetdicom's provider, imports private names
(``pynetdicom._handlers``, ``pynetdicom.dimse._QueueItem``) and writes bytes that must equal
what pynetdicom and pydicom encode: it is imported (through transport.py) only when
:func:`radflow.ingest.receiver.guard.fast_path` finds the releases it was written and tested
against (``guard.WRITTEN_FOR``: pinned in pyproject.toml and constraints.txt). With others, the
receiver logs one warning and runs on pynetdicom's public API
(radflow/ingest/receiver/server.py).
"""

from __future__ import annotations

import logging
import queue
import struct
from collections.abc import Callable
from io import BytesIO, FileIO
from typing import Any, cast

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID as IMPLEMENTATION_UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_VERSION as IMPLEMENTATION_VERSION
from pynetdicom import evt
from pynetdicom._handlers import standard_dimse_recv_handler, standard_dimse_sent_handler
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider, _QueueItem
from pynetdicom.dimse_primitives import C_STORE, DimsePrimitiveType
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from radflow.ingest.receiver.spool import IncomingFiles
from radflow.outages import describe

logger = logging.getLogger(__name__)

# Command set tags (group 0x0000: only the element number varies), PS3.7 Annex E.
GROUP_LENGTH = 0x0000
AFFECTED_SOP_CLASS_UID = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_RESPONDED_TO = 0x0120
PRIORITY = 0x0700
DATA_SET_TYPE = 0x0800
STATUS = 0x0900
AFFECTED_SOP_INSTANCE_UID = 0x1000

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
NO_DATA_SET = 0x0101
# A C-STORE-RQ made of exactly these elements is taken by the fast path; others (Move
# Originator AE title and Message ID, non-standard extras) go to pynetdicom.
STORE_RQ_TAGS = frozenset(
    {
        GROUP_LENGTH,
        AFFECTED_SOP_CLASS_UID,
        COMMAND_FIELD,
        MESSAGE_ID,
        PRIORITY,
        DATA_SET_TYPE,
        AFFECTED_SOP_INSTANCE_UID,
    }
)
# Message control header bits of a PDV (PS3.8 Annex E.2).
COMMAND_BIT = 0x01
LAST_FRAGMENT_BIT = 0x02

_ELEMENT_HEADER = struct.Struct("<HHL")
_US = struct.Struct("<H")
_UL = struct.Struct("<L")
_PREAMBLE = b"\x00" * 128 + b"DICM"


# -- encoding and decoding -------------------------------------------------------------------


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _ui(uid: str) -> bytes:
    """A UI value: padded to even length with a NUL (PS3.5 6.2)."""
    return _even(uid.encode("latin-1"), b"\x00")


def _implicit(element: int, value: bytes) -> bytes:
    """One command element, Implicit VR Little Endian (group 0x0000)."""
    return _ELEMENT_HEADER.pack(0x0000, element, len(value)) + value


def encode_store_response(
    message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int
) -> bytes:
    """The command set of a C-STORE-RSP carrying only a status (PS3.7 9.3.1.2)."""
    body = b"".join(
        (
            _implicit(AFFECTED_SOP_CLASS_UID, _ui(sop_class_uid)),
            _implicit(COMMAND_FIELD, _US.pack(C_STORE_RSP)),
            _implicit(MESSAGE_ID_RESPONDED_TO, _US.pack(message_id)),
            _implicit(DATA_SET_TYPE, _US.pack(NO_DATA_SET)),
            _implicit(STATUS, _US.pack(status)),
            _implicit(AFFECTED_SOP_INSTANCE_UID, _ui(sop_instance_uid)),
        )
    )
    return _implicit(GROUP_LENGTH, _UL.pack(len(body))) + body


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    """One file meta element (group 0x0002), Explicit VR Little Endian."""
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and file meta information, as pynetdicom writes them (PS3.10 7.1)."""
    body = b"".join(
        (
            _explicit(0x0001, b"OB", b"\x00\x01"),
            _explicit(0x0002, b"UI", _ui(sop_class_uid)),
            _explicit(0x0003, b"UI", _ui(sop_instance_uid)),
            _explicit(0x0010, b"UI", _ui(transfer_syntax)),
            _explicit(0x0012, b"UI", _ui(IMPLEMENTATION_UID)),
            _explicit(0x0013, b"SH", _even(IMPLEMENTATION_VERSION.encode("latin-1"), b" ")),
        )
    )
    return _PREAMBLE + _explicit(0x0000, b"UL", _UL.pack(len(body))) + body


def decode_command_set(data: bytes | memoryview) -> dict[int, bytes]:
    """Element number -> raw value of an Implicit VR Little Endian group 0x0000 command set.

    Raises ValueError for anything else (another group, a value running past the end).
    """
    elements: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < _ELEMENT_HEADER.size:
            raise ValueError("truncated command element")
        group, element, length = _ELEMENT_HEADER.unpack_from(data, offset)
        offset += _ELEMENT_HEADER.size
        if group != 0x0000 or length > end - offset:
            raise ValueError("not a command set element")
        elements[element] = bytes(data[offset : offset + length])
        offset += length
    return elements


def _uid(value: bytes) -> str | None:
    """A single UID value as pydicom reads it; None if pydicom would not read it as one."""
    text = value.decode("latin-1").rstrip("\0 ")
    return text if text and "\\" not in text else None


def _us(value: bytes | None) -> int | None:
    return _US.unpack(value)[0] if value is not None and len(value) == 2 else None


def store_request(elements: dict[int, bytes]) -> C_STORE | None:
    """The C-STORE request primitive of a command set, if the fast path takes it; else None."""
    if not elements.keys() <= STORE_RQ_TAGS or _us(elements.get(COMMAND_FIELD)) != C_STORE_RQ:
        return None
    data_set_type = _us(elements.get(DATA_SET_TYPE))
    message_id, priority = _us(elements.get(MESSAGE_ID)), _us(elements.get(PRIORITY))
    sop_class = _uid(elements.get(AFFECTED_SOP_CLASS_UID, b""))
    sop_instance = _uid(elements.get(AFFECTED_SOP_INSTANCE_UID, b""))
    if data_set_type in (None, NO_DATA_SET) or message_id is None or priority is None:
        return None
    if sop_class is None or sop_instance is None:
        return None
    request = C_STORE()
    try:
        # pynetdicom's setters check the values, exactly as for a request it decodes itself.
        request.MessageID = message_id
        request.Priority = priority
        request.AffectedSOPClassUID = sop_class
        request.AffectedSOPInstanceUID = sop_instance
    except (TypeError, ValueError):
        return None  # pynetdicom decides what a malformed request gets
    request.DataSet = BytesIO()  # as pynetdicom leaves it when the dataset goes to a file
    return request


# -- the provider ----------------------------------------------------------------------------


class _Incoming:
    """The dataset of one C-STORE-RQ being streamed into its spool file.

    A write that fails (the spool's disk full) must not end the association: the file is
    deleted, the rest of the dataset is read and dropped, and the request goes on to the
    receiver's handler marked spoiled (``IncomingFiles.spoil``), which refuses it with 0xA701.
    """

    def __init__(self, request: C_STORE, context_id: int, incoming: IncomingFiles, header: bytes):
        self.request, self.context_id, self.incoming = request, context_id, incoming
        self.file: FileIO | None = None
        try:
            self.path = incoming.take()
            # Unbuffered: one write system call per PDV, nothing to flush. The file exists,
            # empty (IncomingFiles): opened without O_CREAT, which would wait for the folder's
            # lock while the next file is being made.
            self.file = FileIO(self.path, "r+b")
            self.write(memoryview(header))
        except OSError as exc:
            if self.file is None:
                self.path = incoming.folder / f"unwritten-{id(self)}.dcm"  # never on disk
            self._spoil(exc)
        # pynetdicom's storage service closes and deletes the file after the C-STORE handler.
        request._dataset_path = self.path
        request._dataset_file = cast(Any, self.file)
        request._context_id = context_id

    def write(self, data: memoryview) -> None:
        if self.file is None or self.file.closed:
            return  # spoiled: the rest of the dataset is dropped
        try:
            while data:
                written = self.file.write(data)
                data = data[written or 0 :]
        except OSError as exc:
            self._spoil(exc)

    def _spoil(self, error: OSError) -> None:
        logger.error("cannot write a received dataset to the spool: %s", describe(error))
        self.incoming.spoil(self.path, error)
        self.discard()

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
        self.path.unlink(missing_ok=True)


class ReceiverDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, with the C-STORE fast path of this module."""

    # Responses sent from the association's thread (see _send_now).
    direct_send = True
    # Seconds the association's reactor may wait for a request in one poll (see get_msg): a
    # release request is answered at most this much later.
    reactor_wait = 0.005

    def __init__(self, assoc: Association, incoming: IncomingFiles) -> None:
        super().__init__(assoc)
        self.incoming = incoming
        self._store: _Incoming | None = None

    def receive_primitive(self, primitive: P_DATA) -> None:
        pdvs = primitive.presentation_data_value_list
        for index, (context_id, data) in enumerate(pdvs):
            if self._store is not None:
                self._receive_data(context_id, data)
            elif self.message is not None or not self._start_store(context_id, data):
                # pynetdicom's own path, from this PDV on (it also ends the message there). It
                # takes bytes; the receiver's DUL gives views (transport.py).
                rest = P_DATA()
                rest.presentation_data_value_list.extend((c, bytes(d)) for c, d in pdvs[index:])
                super().receive_primitive(rest)
                return

    def _start_store(self, context_id: int, data: bytes) -> bool:
        """Take a C-STORE-RQ command set in one PDV; False to leave the PDV to pynetdicom."""
        if data[0] & (COMMAND_BIT | LAST_FRAGMENT_BIT) != COMMAND_BIT | LAST_FRAGMENT_BIT:
            return False
        if _logged(self.assoc, evt.EVT_DIMSE_RECV, standard_dimse_recv_handler):
            return False
        context = self.assoc._accepted_cx.get(context_id)
        if context is None or not context.transfer_syntax:
            return False
        try:
            request = store_request(decode_command_set(memoryview(data)[1:]))
        except ValueError:
            return False
        if request is None:
            return False
        header = encode_file_meta(
            str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID),
            str(context.transfer_syntax[0]),
        )
        self._store = _Incoming(request, context_id, self.incoming, header)
        return True

    def _receive_data(self, context_id: int, data: bytes) -> None:
        store = cast(_Incoming, self._store)
        if data[0] & COMMAND_BIT or context_id != store.context_id:
            # A new command before the dataset's last fragment: the peer broke PS3.8 Annex E.
            self._store = None
            store.discard()
            raise ValueError("a C-STORE data set was interrupted by another PDV")
        store.write(memoryview(data)[1:])
        if data[0] & LAST_FRAGMENT_BIT:
            self._store = None
            self.msg_queue.put((store.context_id, store.request))

    def discard_partial(self, event: evt.Event | None = None) -> None:
        """Delete the dataset being received, if any: the association has ended before it did
        (bound to EVT_CONN_CLOSE by the fast path's request handler)."""
        store, self._store = self._store, None
        if store is not None:
            store.discard()

    def send_msg(self, primitive: DimsePrimitiveType, context_id: int) -> None:
        command = self._store_response(primitive)
        if command is None or not _fits(command, self.maximum_pdu_size):
            super().send_msg(primitive, context_id)
        else:
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
            if not self._send_now(pdata):
                self.dul.send_pdu(pdata)
        if isinstance(primitive, C_STORE):
            # The sender turns to its next instance: the file for it is made meanwhile.
            self.incoming.prepare()

    def _send_now(self, pdata: P_DATA) -> bool:
        """Send from this (the association's) thread, as the DUL thread would; False if not now.

        pynetdicom queues each response for its DUL thread, which looks at the queue between
        1 ms naps while the sender waits. In state Sta6 (association established) with nothing
        queued ahead, sending a P-DATA is the state machine's action DT-1 and leaves the state
        as it is, so this does exactly that here. The socket's sends are serialised
        (:class:`radflow.ingest.receiver.transport.BulkReadSocket`), so a PDU the DUL thread sends
        meanwhile (an A-ABORT) cannot interleave with this one.
        """
        if not self.direct_send:
            return False
        if self.dul.state_machine.current_state != "Sta6" or self.dul.to_provider_queue.qsize():
            return False
        self.dul._send(P_DATA_TF(pdata))
        return True

    def get_msg(self, block: bool = False) -> _QueueItem:
        """The next request; the association's reactor polls with ``block=False``.

        Its loop naps 1 ms between polls, so a request waits up to a millisecond before it is
        served, on every instance of a series. Waiting here instead, up to
        :attr:`reactor_wait` (after which the reactor does its other checks: release, abort,
        timeouts, as often as before), serves a request as soon as it is complete.
        """
        if block or not self.reactor_wait:
            return super().get_msg(block)
        try:
            return self.msg_queue.get(timeout=self.reactor_wait)
        except queue.Empty:
            return None, None

    def _store_response(self, primitive: DimsePrimitiveType) -> bytes | None:
        """A C-STORE-RSP's command set, if it carries nothing but a status; else None."""
        if not isinstance(primitive, C_STORE) or primitive.MessageIDBeingRespondedTo is None:
            return None
        if primitive.ErrorComment is not None or primitive.OffendingElement is not None:
            return None
        if _logged(self.assoc, evt.EVT_DIMSE_SENT, standard_dimse_sent_handler):
            return None
        parts = (
            primitive.AffectedSOPClassUID,
            primitive.AffectedSOPInstanceUID,
            primitive.Status,
        )
        if any(part is None for part in parts):
            return None
        return encode_store_response(
            primitive.MessageIDBeingRespondedTo,
            str(primitive.AffectedSOPClassUID),
            str(primitive.AffectedSOPInstanceUID),
            cast(int, primitive.Status),
        )


def _fits(command: bytes, max_pdu: int) -> bool:
    """One PDV holds it (pynetdicom fragments longer command sets; 0 means no limit)."""
    return max_pdu == 0 or len(command) + 6 <= max_pdu


def _logged(
    assoc: Association, event: evt.NotificationEvent, standard: Callable[..., object]
) -> bool:
    """Whether someone would see ``event``: a handler besides pynetdicom's standard logger,
    or that logger with its output enabled (it logs received and sent messages at INFO)."""
    # A notification event's handlers: (handler, extra arguments) pairs.
    handlers = cast(list[tuple[Callable[..., object], object]], assoc.get_handlers(event))
    for handler, _ in handlers:
        if handler is not standard or _PYNETDICOM_LOG.isEnabledFor(logging.INFO):
            return True
    return False


_PYNETDICOM_LOG = logging.getLogger("pynetdicom")
