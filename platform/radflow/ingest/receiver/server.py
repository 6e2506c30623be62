"""The receiver's association server, on pynetdicom's public API only.

This is the plain path, and what the fast path (:mod:`radflow.ingest.receiver.transport`) builds
on when :mod:`radflow.ingest.receiver.guard` allows it:

- **Made with** ``AE.make_server(server_class=, request_handler=)`` and served from a thread
  started here, so that one server class covers a receiver's own address and the listening
  socket that worker processes share (receiver/workers.py).
- **No Nagle delay.** Each response is sent at once (``TCP_NODELAY``, as DCMTK and Orthanc do
  with ``TCP_NODELAY=1``): a C-STORE response held back by Nagle's algorithm waits for the
  sender's delayed ACK, up to 40 ms per instance on Linux (``benchmarks/ingest.py``).
- **Datasets streamed to disk**, not held in memory, by pynetdicom's
  ``STORE_RECV_CHUNKED_DATASET`` option (:func:`configure_pynetdicom`): memory does not grow with
  the instance or study size.
"""

from __future__ import annotations

import importlib
import logging
import socket
import threading
from socketserver import BaseServer
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

logger = logging.getLogger(__name__)

# pynetdicom's options, process-wide (it has no per-AE switch for them). Streaming received
# datasets to a file keeps memory flat; identifiers may hold PHI: never logged.
PYNETDICOM_OPTIONS = {
    "STORE_RECV_CHUNKED_DATASET": True,
    "LOG_REQUEST_IDENTIFIERS": False,
    "LOG_RESPONSE_IDENTIFIERS": False,
}


def configure_pynetdicom() -> bool:
    """Set :data:`PYNETDICOM_OPTIONS`; whether received datasets are streamed to disk.

    They live in ``pynetdicom._config``, which pynetdicom documents as its configuration module
    (the "Configuration Options" of its API reference) despite the underscore; it is only used
    here, and only if this pynetdicom has it. Without it, datasets are held in memory (one
    warning says so) and the C-STORE handler writes each to the spool itself.
    """
    try:
        config = importlib.import_module("pynetdicom._config")
    except ImportError:
        config = None
    missing = [name for name in PYNETDICOM_OPTIONS if not hasattr(config, name)]
    for name, value in PYNETDICOM_OPTIONS.items():
        if name not in missing:
            setattr(config, name, value)
    if "STORE_RECV_CHUNKED_DATASET" in missing:
        logger.warning(
            "this pynetdicom has no STORE_RECV_CHUNKED_DATASET option (pynetdicom._config): the "
            "receiver holds each dataset in memory while it arrives, so memory grows with the "
            "instance size. Install pynetdicom==3.0.4 (constraints.txt) to stream them to disk."
        )
        return False
    return True


class AssociationListener(ThreadedAssociationServer):
    """pynetdicom's threaded association server, on its own address or on a shared socket.

    With ``listen_fd``, it accepts from the listening socket the supervisor (receiver/workers.py)
    opened and handed down: every worker waits on it and the first free one takes the next
    connection, so the load follows the workers' actual business (SO_REUSEPORT would spread
    connections by address hash instead, and two of four senders on one worker is then as
    likely as not).
    """

    def __init__(self, *args: Any, listen_fd: int | None = None, **kwargs: Any) -> None:
        self.listen_fd = listen_fd
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.listen_fd is None:
            super().server_bind()
            return
        if self.socket is not None:
            self.socket.close()  # the one socketserver made: this server uses the shared one
        self.socket = socket.socket(fileno=self.listen_fd)
        # Several workers wake for one connection; the others must not block in accept().
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        connection, address = super().get_request()
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection, address

    def server_close(self) -> None:
        if self.listen_fd is None:
            super().server_close()
            return
        # Closed, never shut down: shutdown() would stop the socket the other workers (and the
        # next worker started in this one's place) accept from.
        if self.socket is not None:
            self.socket.close()

    def shutdown(self) -> None:
        """Stop serving and close this server's socket.

        Not :meth:`AssociationServer.shutdown`, which also takes the server out of the list its
        AE keeps of the servers ``AE.start_server`` started: :func:`start_server` starts it.
        """
        BaseServer.shutdown(self)
        self.server_close()


def start_server(
    ae: AE,
    address: tuple[str, int],
    evt_handlers: list[Any],
    *,
    listen_fd: int | None = None,
    server_class: type[AssociationListener] = AssociationListener,
    **options: Any,
) -> AssociationListener:
    """Start ``ae``'s association server in a background thread.

    On ``address``, or on the inherited listening socket ``listen_fd`` (a worker's).
    ``server_class`` and ``options`` (``request_handler=`` and the server class's own arguments)
    go to ``AE.make_server``.
    """
    server = ae.make_server(
        address,
        evt_handlers=evt_handlers,
        server_class=server_class,
        listen_fd=listen_fd,
        **options,
    )
    assert isinstance(server, AssociationListener)
    thread = threading.Thread(
        target=server.serve_forever, name="radflow-dicom-acceptor", daemon=True
    )
    thread.start()
    return server
