"""The receiver's fast path, network side: pynetdicom's association server, set up for throughput.

pynetdicom's defaults are made for portability, not for a scanner pushing slices as fast as the
link allows. Measured with ``benchmarks/ingest.py`` (512x512 CT slices), these cost much of the
receiver's time per instance, and this module changes just those:

- **Large reads.** :class:`~pynetdicom.transport.AssociationSocket` reads a PDU 4 KiB per
  ``recv`` call; a CT slice then costs some 130 Python-level reads and buffer growths, about a
  third of the receiver's CPU per instance under the GIL. :class:`BulkReadSocket` reads up to
  :data:`READ_CHUNK` bytes per call. Memory still grows only with the bytes that actually
  arrive, never with the length a peer declares.
- **Woken by data, not by 1 ms naps.** pynetdicom's DUL reactor naps a millisecond between
  polls (pynetdicom issues #120, #650); :attr:`BulkReadSocket.ready` waits in ``select`` for up
  to :data:`READY_WAIT` instead, so a request from a sender waiting on its previous response is
  read as soon as it arrives.
- **P-DATA without PDU objects.** :class:`ReceiverDUL` reads each P-DATA-TF PDU of an
  established association into one buffer and gives its PDVs straight to DIMSE, as pynetdicom's
  action DT-2 does after decoding, copying and queueing it (~150 µs per 128 KiB PDU).
- **C-STORE without pydicom datasets.** Each association gets the DIMSE provider of
  :mod:`radflow.ingest.receiver.dimse` (C-STORE requests and responses encoded and decoded
  directly, datasets streamed into ``spool/incoming``, responses sent from the association's
  thread).

Over TLS (``RADFLOW_RECEIVER_TLS_*``) only the large reads and the C-STORE provider apply, its
responses sent by the DUL thread (:func:`_over_tls` says why).

The other measured cost, Nagle's algorithm, is turned off on both paths (``TCP_NODELAY``,
radflow/ingest/receiver/server.py).

**The guard.** To do this, the module overrides a private method of pynetdicom's request
handler (``_create_association``), swaps the class of the socket and DUL provider pynetdicom
made, and imports private names. Only :func:`~radflow.ingest.receiver.guard.fast_path` imports
it, once the installed pynetdicom and pydicom are the releases it was written for
(``guard.WRITTEN_FOR``) and ``RADFLOW_RECEIVER_FAST_PATH`` is on. Otherwise, or if an import
here fails, the receiver runs on pynetdicom's public API (radflow/ingest/receiver/server.py,
which also sets pynetdicom's documented configuration options if it has them) and touches
nothing else of pynetdicom's.

Everything else (association negotiation, the state machine outside data transfer, the
C-STORE service) is pynetdicom's own, plugged in through its server extension point
(``AE.make_server(server_class=, request_handler=)``); tests/ingest/receiver exercise it with
DCMTK and Orthanc, on this path and the plain one. Tried and dropped (measured slower,
benchmarks/README.md): hashing each fragment as it arrives, starting the writeback of each
fragment early (``sync_file_range``), a shorter GIL switch interval.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
import threading
from typing import Any, cast

from pynetdicom import AE, evt
from pynetdicom._handlers import standard_pdu_recv_handler
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

from radflow.ingest.receiver import dimse, server
from radflow.ingest.receiver.server import AssociationListener, Refused
from radflow.ingest.receiver.spool import IncomingFiles

logger = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
# Seconds the DUL thread waits for incoming data per look (see BulkReadSocket.ready).
READY_WAIT = 0.005


class BulkReadSocket(AssociationSocket):
    """An association socket that reads what the kernel has, up to :data:`READ_CHUNK` a call.

    Its sends are serialised: the receiver's DIMSE provider sends C-STORE responses from the
    association's thread (radflow/ingest/receiver/dimse.py), pynetdicom everything else from its
    DUL thread, and two PDUs must never interleave on the wire.
    """

    _send_lock: threading.Lock
    ready_wait = READY_WAIT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._send_lock = threading.Lock()

    @classmethod
    def adopt(cls, sock: AssociationSocket) -> BulkReadSocket:
        """Turn the socket pynetdicom made into one of these (its constructor cannot run twice:
        it also queues the transport event)."""
        sock.__class__ = cls
        adopted = cast(BulkReadSocket, sock)
        adopted._send_lock = threading.Lock()
        return adopted

    def send(self, bytestream: bytes) -> None:
        with self._send_lock:
            super().send(bytestream)

    @property
    def ready(self) -> bool:
        """Whether a PDU is arriving, waiting up to :data:`READY_WAIT` seconds for one.

        pynetdicom's DUL thread asks this between 1 ms naps, with no wait: a request from a
        sender waiting for our previous response then sits up to a millisecond unread, once
        per instance. Waiting in ``select`` wakes the thread as soon as the bytes arrive; what
        the DUL thread otherwise checks between naps (primitives queued by the association
        thread: a C-ECHO response, a release response; its timers) is seen at most
        :data:`READY_WAIT` later. C-STORE responses do not wait for it (dimse.py sends them).
        """
        if not self.ready_wait or self.socket is None or self._is_connected is False:
            return bool(super().ready)
        if self.assoc.dul.to_provider_queue.qsize():
            return bool(super().ready)  # something to send: do not delay it
        try:
            readable, _, _ = select.select([self.socket], [], [], self.ready_wait)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # as pynetdicom: the connection is gone
            return False
        return bool(readable)

    def peek(self, nr_bytes: int) -> bytes | None:
        """The next ``nr_bytes`` without consuming them; None if fewer have arrived."""
        assert self.socket is not None, "socket closed"
        try:
            data = self.socket.recv(nr_bytes, socket.MSG_PEEK)
        except OSError:
            return None
        return data if len(data) == nr_bytes else None

    def recv_exactly(self, nr_bytes: int) -> bytearray | None:
        """Read ``nr_bytes`` into one buffer of that size; None if the connection ends first."""
        assert self.socket is not None, "socket closed"
        buffer = bytearray(nr_bytes)
        view, received = memoryview(buffer), 0
        while received < nr_bytes:
            try:
                count = self.socket.recv_into(view[received:])
            except OSError:  # includes a timeout
                return None
            if not count:
                return None
            received += count
        return buffer

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (fewer only if the peer closes the connection), as pynetdicom does."""
        assert self.socket is not None, "socket closed"
        data = bytearray()
        while len(data) < nr_bytes:
            piece = self.socket.recv(min(READ_CHUNK, nr_bytes - len(data)))
            if not piece:
                break  # connection closed: pynetdicom sees the short read and aborts
            data += piece
        return data


class ReceiverDUL(DULServiceProvider):
    """pynetdicom's DUL provider, reading the P-DATA-TF PDUs of an established association.

    For each PDU pynetdicom grows a buffer as the bytes arrive, copies it, decodes it into PDU
    and item objects, queues an FSM event, takes it back and only then (action DT-2) gives the
    presentation data values to DIMSE: ~150 µs per 128 KiB PDU on this machine, on the thread
    the sender's data waits for. In state Sta6 (established) with no event pending, this reads
    a P-DATA-TF PDU (no longer than this receiver's maximum PDU length) into one buffer of its
    size and gives DIMSE views of its PDVs, which is all DT-2 does; the state stays Sta6, as
    with DT-2. Any other PDU, state or length, and an association whose PDU or FSM events
    someone observes, are pynetdicom's; a malformed PDU is Evt19, as in pynetdicom.
    """

    @classmethod
    def adopt(cls, dul: DULServiceProvider) -> ReceiverDUL:
        dul.__class__ = cls  # made (and its thread set up) by pynetdicom's Association
        return cast(ReceiverDUL, dul)

    def _read_pdu_data(self) -> None:
        if not self._read_data_pdu():
            super()._read_pdu_data()
            return
        # The reactor naps 1 ms after a pass that queued no FSM event, which this path never
        # queues: the PDUs of a data set already in the socket are read now.
        while self._more_data() and self._read_data_pdu():
            pass

    def _read_data_pdu(self) -> bool:
        """Read a P-DATA-TF PDU and give its PDVs to DIMSE; False (nothing read) if not one."""
        if self.state_machine.current_state != "Sta6" or self.event_queue.qsize():
            return False
        if _observed(self.assoc):
            return False
        sock = cast(BulkReadSocket, self.socket)
        head = sock.peek(_PDU_HEADER.size)
        if head is None:
            return False
        pdu_type, _, length = _PDU_HEADER.unpack(head)
        if pdu_type != P_DATA_TF_TYPE or not 0 < length <= self.assoc.acceptor.maximum_length:
            return False
        pdu = sock.recv_exactly(_PDU_HEADER.size + length)
        if pdu is None:
            self.event_queue.put("Evt17")  # as pynetdicom: connection closed mid-PDU
            return True
        pdvs = presentation_data_values(memoryview(pdu)[_PDU_HEADER.size :])
        if pdvs is None:
            logger.error("a P-DATA-TF PDU from %s is malformed", self.assoc.requestor.ae_title)
            self.event_queue.put("Evt19")  # as pynetdicom: invalid PDU, the association aborts
            return True
        primitive = P_DATA()
        # Views, not bytes: only ReceiverDIMSE reads them (it hands pynetdicom bytes).
        primitive.presentation_data_value_list.extend(cast(list[tuple[int, bytes]], pdvs))
        self.assoc.dimse.receive_primitive(primitive)
        return True

    def _more_data(self) -> bool:
        """More bytes wait in the socket and nothing waits to be sent."""
        sock = cast(BulkReadSocket, self.socket)
        if sock.socket is None or self.to_provider_queue.qsize():
            return False
        try:
            readable, _, _ = select.select([sock.socket], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(readable)


P_DATA_TF_TYPE = 0x04
_PDU_HEADER = struct.Struct(">BBL")
_PDV_LENGTH = struct.Struct(">L")


def presentation_data_values(body: memoryview) -> list[tuple[int, memoryview]] | None:
    """(context ID, message control header + fragment) of each PDV item of a P-DATA-TF PDU's
    body (PS3.8 9.3.5.1); None if the items do not fill it exactly or one has no data."""
    pdvs: list[tuple[int, memoryview]] = []
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < _PDV_LENGTH.size + 2:
            return None
        (length,) = _PDV_LENGTH.unpack_from(body, offset)
        start, stop = offset + _PDV_LENGTH.size, offset + _PDV_LENGTH.size + length
        if length < 2 or stop > end:
            return None
        pdvs.append((body[start], body[start + 1 : stop]))
        offset = stop
    return pdvs or None


def _observed(assoc: Association) -> bool:
    """Whether a handler waits for an event the P-DATA-TF path does not trigger.

    pynetdicom's standard EVT_PDU_RECV handler logs nothing for P-DATA-TF PDUs.
    """
    if assoc.get_handlers(evt.EVT_DATA_RECV) or assoc.get_handlers(evt.EVT_FSM_TRANSITION):
        return True
    handlers = cast(list[tuple[object, object]], assoc.get_handlers(evt.EVT_PDU_RECV))
    return any(handler is not standard_pdu_recv_handler for handler, _ in handlers)


class ReceiverRequestHandler(RequestHandler):
    """pynetdicom's handler for one incoming connection, with the association set up as above."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # pynetdicom has just wrapped the connection in its AssociationSocket.
        sock = BulkReadSocket.adopt(cast(AssociationSocket, assoc.dul.socket))
        provider = dimse.ReceiverDIMSE(assoc, cast(ReceiverServer, self.server).incoming)
        assoc.dimse = provider
        # A dataset cut by the association's end (abort, reset, timeout) is nobody's.
        assoc.bind(evt.EVT_CONN_CLOSE, provider.discard_partial)
        if isinstance(self.request, ssl.SSLSocket):
            _over_tls(sock, provider)
        else:
            ReceiverDUL.adopt(assoc.dul)
        return assoc


def _over_tls(sock: BulkReadSocket, provider: dimse.ReceiverDIMSE) -> None:
    """Keep, over TLS, what does not look past the TLS layer: large reads and the C-STORE
    provider. TLS records cannot be peeked at (ReceiverDUL), decrypted bytes OpenSSL holds are
    invisible to ``select`` (pynetdicom's ``ready`` asks OpenSSL too), and one TLS connection
    must not read in one thread while it writes in another (responses go through the DUL
    thread, as in pynetdicom)."""
    sock.ready_wait = 0.0
    provider.direct_send = False


class ReceiverServer(AssociationListener):
    """The receiver's association server, knowing where the fast path streams datasets."""

    def __init__(self, *args: Any, incoming: IncomingFiles, **kwargs: Any) -> None:
        self.incoming = incoming
        super().__init__(*args, **kwargs)


def start_server(
    ae: AE,
    address: tuple[str, int],
    evt_handlers: list[Any],
    *,
    incoming: IncomingFiles,
    listen_fd: int | None = None,
    on_refused: Refused | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AssociationListener:
    """:func:`radflow.ingest.receiver.server.start_server` with the fast path's classes.

    Received datasets are streamed into files ``incoming`` makes ahead.
    """
    return server.start_server(
        ae,
        address,
        evt_handlers,
        listen_fd=listen_fd,
        on_refused=on_refused,
        ssl_context=ssl_context,
        server_class=ReceiverServer,
        request_handler=ReceiverRequestHandler,
        incoming=incoming,
    )
