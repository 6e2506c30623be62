"""The receiver's network side: pynetdicom's association server, set up for throughput.

pynetdicom's defaults are made for portability, not for a scanner pushing slices as fast as the
link allows. Measured with ``benchmarks/ingest.py`` (512x512 CT slices), two of them cost much
of the receiver's time per instance, and this module changes just those:

- **Large reads.** :class:`~pynetdicom.transport.AssociationSocket` reads a PDU 4 KiB per
  ``recv`` call; a CT slice then costs some 130 Python-level reads and buffer growths, about a
  third of the receiver's CPU per instance under the GIL. :class:`BulkReadSocket` reads up to
  :data:`READ_CHUNK` bytes per call. Memory still grows only with the bytes that actually
  arrive, never with the length a peer declares.
- **No Nagle delay.** Each response is sent at once (``TCP_NODELAY``, as DCMTK and Orthanc do
  with ``TCP_NODELAY=1``): a C-STORE response held back by Nagle's algorithm waits for the
  sender's delayed ACK, up to 40 ms on Linux.

Everything else (association negotiation, the state machine, DIMSE, the C-STORE service) is
pynetdicom's own, plugged in through its server extension point (``AE.make_server(server_class=,
request_handler=)``); tests/receiver exercise it with DCMTK and Orthanc. pynetdicom's reactors
also poll every millisecond (pynetdicom issues #120, #650); waking them on data instead was
tried and measured no faster here (the 1 ms naps let a whole slice arrive before it is read).
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

READ_CHUNK = 256 * 1024


class BulkReadSocket(AssociationSocket):
    """An association socket that reads what the kernel has, up to :data:`READ_CHUNK` a call."""

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
        # pynetdicom has just wrapped the connection in its AssociationSocket (whose constructor
        # also queues the transport event, so it cannot be made twice); only reading differs.
        assoc.dul.socket.__class__ = BulkReadSocket
        return assoc


class SharedListenerServer(ThreadedAssociationServer):
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
    ae: AE, address: tuple[str, int], evt_handlers: list[Any], *, listen_fd: int | None = None
) -> ThreadedAssociationServer:
    """Start ``ae``'s association server in a background thread.

    On ``address``, or on the inherited listening socket ``listen_fd`` (a worker's).
    """
    server: ThreadedAssociationServer
    if listen_fd is None:
        server = ae.make_server(
            address,
            evt_handlers=evt_handlers,
            server_class=ThreadedAssociationServer,
            request_handler=ReceiverRequestHandler,
        )
    else:
        server = ae.make_server(
            address,
            evt_handlers=evt_handlers,
            server_class=SharedListenerServer,
            request_handler=ReceiverRequestHandler,
            listen_fd=listen_fd,
        )
    # Registered as AE.start_server does: server.shutdown() and AE.shutdown() look it up there.
    ae._servers.append(server)
    thread = threading.Thread(
        target=server.serve_forever, name="radflow-dicom-acceptor", daemon=True
    )
    thread.start()
    return server
