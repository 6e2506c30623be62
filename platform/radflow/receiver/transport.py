"""The receiver's network side: pynetdicom's association server, set up for throughput.

pynetdicom's defaults are made for portability, not for a scanner pushing slices as fast as the
link allows. Measured with ``benchmarks/ingest.py`` (512x512 CT slices), these cost much of the
receiver's time per instance, and this module changes just those:

- **Large reads.** :class:`~pynetdicom.transport.AssociationSocket` reads a PDU 4 KiB per
  ``recv`` call; a CT slice then costs some 130 Python-level reads and buffer growths, about a
  third of the receiver's CPU per instance under the GIL. :class:`BulkReadSocket` reads up to
  :data:`READ_CHUNK` bytes per call. Memory still grows only with the bytes that actually
  arrive, never with the length a peer declares.
- **No Nagle delay.** Each response is sent at once (``TCP_NODELAY``, as DCMTK and Orthanc do
  with ``TCP_NODELAY=1``): a C-STORE response held back by Nagle's algorithm waits for the
  sender's delayed ACK, up to 40 ms on Linux.
- **Woken by data, not by 1 ms naps.** pynetdicom's DUL reactor naps a millisecond between
  polls (pynetdicom issues #120, #650); :attr:`BulkReadSocket.ready` waits in ``select`` for up
  to :data:`READY_WAIT` instead, so a request from a sender waiting on its previous response is
  read as soon as it arrives.
- **C-STORE without pydicom datasets.** Each association gets the DIMSE provider of
  :mod:`radflow.receiver.dimse` (C-STORE requests and responses encoded and decoded directly,
  datasets streamed into ``spool/incoming``, responses sent from the association's thread),
  when pynetdicom is the version it was written for.

Everything else (association negotiation, the state machine, the C-STORE service) is
pynetdicom's own, plugged in through its server extension point (``AE.make_server(server_class=,
request_handler=)``); tests/receiver exercise it with DCMTK and Orthanc. Tried and dropped
(measured slower, benchmarks/README.md): hashing each fragment as it arrives, starting the
writeback of each fragment early (``sync_file_range``), a shorter GIL switch interval.
"""

from __future__ import annotations

import select
import socket
import threading
from typing import Any, cast

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from radflow.receiver import dimse
from radflow.receiver.spool import IncomingFiles

READ_CHUNK = 256 * 1024
# Seconds the DUL thread waits for incoming data per look (see BulkReadSocket.ready).
READY_WAIT = 0.005


class BulkReadSocket(AssociationSocket):
    """An association socket that reads what the kernel has, up to :data:`READ_CHUNK` a call.

    Its sends are serialised: the receiver's DIMSE provider sends C-STORE responses from the
    association's thread (radflow/receiver/dimse.py), pynetdicom everything else from its DUL
    thread, and two PDUs must never interleave on the wire.
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


class ReceiverRequestHandler(RequestHandler):
    """pynetdicom's handler for one incoming connection, with the socket set up as above."""

    def _create_association(self) -> Association:
        connection: socket.socket = self.request
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assoc = super()._create_association()
        # pynetdicom has just wrapped the connection in its AssociationSocket.
        BulkReadSocket.adopt(cast(AssociationSocket, assoc.dul.socket))
        server = cast(ReceiverServer, self.server)
        if server.fast_dimse:
            assoc.dimse = dimse.ReceiverDIMSE(assoc, server.incoming)
        return assoc


class ReceiverServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, knowing where the receiver streams incoming datasets."""

    def __init__(self, *args: Any, incoming: IncomingFiles, **kwargs: Any) -> None:
        self.incoming = incoming
        # Checked once per server: a pynetdicom other than the pinned one gets one warning.
        self.fast_dimse = dimse.supported()
        super().__init__(*args, **kwargs)


class SharedListenerServer(ReceiverServer):
    """A server accepting from a listening socket that other receiver processes share.

    The supervisor (receiver/workers.py) opens the socket and hands it down; every worker
    waits on it and the first free one takes the next connection, so the load follows the
    workers' actual business (SO_REUSEPORT would spread connections by address hash instead,
    and two of four senders on one worker is then as likely as not).
    """

    def __init__(self, *args: Any, listen_fd: int, **kwargs: Any) -> None:
        self.listen_fd = listen_fd
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()  # the one socketserver made: this server uses the shared one
        self.socket = socket.socket(fileno=self.listen_fd)
        # Several workers wake for one connection; the others must not block in accept().
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()


def start_server(
    ae: AE,
    address: tuple[str, int],
    evt_handlers: list[Any],
    *,
    incoming: IncomingFiles,
    listen_fd: int | None = None,
) -> ReceiverServer:
    """Start ``ae``'s association server in a background thread.

    On ``address``, or on the inherited listening socket ``listen_fd`` (a worker's). Received
    datasets are streamed into files ``incoming`` makes ahead.
    """
    server: ThreadedAssociationServer
    if listen_fd is None:
        server = ae.make_server(
            address,
            evt_handlers=evt_handlers,
            server_class=ReceiverServer,
            request_handler=ReceiverRequestHandler,
            incoming=incoming,
        )
    else:
        server = ae.make_server(
            address,
            evt_handlers=evt_handlers,
            server_class=SharedListenerServer,
            request_handler=ReceiverRequestHandler,
            incoming=incoming,
            listen_fd=listen_fd,
        )
    # Registered as AE.start_server does: server.shutdown() and AE.shutdown() look it up there.
    ae._servers.append(server)
    thread = threading.Thread(
        target=server.serve_forever, name="radflow-dicom-acceptor", daemon=True
    )
    thread.start()
    return cast(ReceiverServer, server)
