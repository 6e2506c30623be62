"""The receiver's association server, on pynetdicom's public API only.

This is the plain path, and what the fast path (:mod:`radflow.ingest.receiver.transport`) builds
on when :mod:`radflow.ingest.receiver.guard` allows it:

- **Made with** ``AE.make_server(server_class=, request_handler=)`` and served from a thread
  started here, so that one server class covers a receiver's own address and the listening
  socket that worker processes share (receiver/workers.py).
- **No Nagle delay.** Each response is sent at once (``TCP_NODELAY``, as DCMTK and Orthanc do
  with ``TCP_NODELAY=1``): a C-STORE response held back by Nagle's algorithm waits for the
  sender's delayed ACK, up to 40 ms per instance on Linux (``benchmarks/ingest.py``).
- **Bounded PDUs.** Every connection is read through a :class:`PduGate`: a PDU longer than
  the maximum the receiver announces (``RADFLOW_RECEIVER_MAX_PDU_BYTES``), or anything but an
  A-ASSOCIATE-RQ as the first PDU, ends the connection with an A-ABORT before its body is read.
  pynetdicom reads whatever length a PDU header declares (a peer declaring 4 GiB was buffered
  whole), on both paths, with TLS or without.
- **TLS in each connection's thread.** With an SSL context (pynetdicom's ``ssl_context``, made
  by radflow/ingest/receiver/tls.py) the TLS handshake runs in the connection's own thread,
  bounded in time, not in the thread that accepts every connection as in pynetdicom: a peer
  that connects and says nothing, or speaks DICOM without TLS, is refused (logged, counted,
  recorded) while the others are served.
- **Datasets streamed to disk**, not held in memory, by pynetdicom's
  ``STORE_RECV_CHUNKED_DATASET`` option (:func:`configure_pynetdicom`): memory does not grow with
  the instance or study size.
- **One line per malformed PDU.** pynetdicom logs what a peer got wrong with a traceback;
  :class:`OneLineErrors` makes that one line, and any other failure's traceback appear once.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from socketserver import BaseServer
from typing import TYPE_CHECKING, Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from radflow.ingest.receiver.statuses import PDU_TOO_LARGE, TLS_HANDSHAKE_FAILED
from radflow.outages import describe

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

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
    _one_line_errors()
    if "STORE_RECV_CHUNKED_DATASET" in missing:
        logger.warning(
            "this pynetdicom has no STORE_RECV_CHUNKED_DATASET option (pynetdicom._config): the "
            "receiver holds each dataset in memory while it arrives, so memory grows with the "
            "instance size. Install pynetdicom==3.0.4 (constraints.txt) to stream them to disk."
        )
        return False
    return True


class OneLineErrors(logging.Filter):
    """pynetdicom's error records: one line each for what a peer sent, a traceback once for
    anything else.

    pynetdicom logs a failure as an error line saying what it was doing, then the exception
    with its traceback (``LOGGER.exception``): for a malformed PDU or DIMSE message, or a
    connection cut mid-PDU, that is a traceback per bad peer. Those become one line, the two
    records merged; any other exception keeps its traceback the first time it is seen and is
    one line after (as :class:`radflow.outages.FailureLog` does for Radflow's own loops).
    """

    # pynetdicom's lines before an exception caused by what the peer sent (dul.py, dimse.py).
    PEER_FAILURES = frozenset(
        {
            "Unable to decode the received PDU data",
            "Received an invalid DIMSE message",
            "Connection closed before the entire PDU was received",
        }
    )

    def __init__(self) -> None:
        super().__init__()
        self._context = threading.local()  # a peer failure's line, until its exception record
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info is None or record.exc_info[1] is None:
            message = record.getMessage()
            if record.levelno >= logging.ERROR and message in self.PEER_FAILURES:
                self._context.line = message
                return False  # said with the exception that follows
            return True
        exc = record.exc_info[1]
        context: str | None = getattr(self._context, "line", None)
        self._context.line = None
        key = (type(exc).__name__, describe(exc))
        with self._lock:
            first = context is None and key not in self._seen
            self._seen.add(key)
        if first:
            return True
        record.msg, record.args = "%s: %s", (context or "again", describe(exc))
        record.exc_info = record.exc_text = None
        return True


_ONE_LINE_ERRORS = OneLineErrors()


def _one_line_errors() -> None:
    """Put :data:`_ONE_LINE_ERRORS` on every pynetdicom logger (a logger's filters do not apply
    to its children's records; pynetdicom makes one logger per module at import)."""
    names = [n for n in logging.Logger.manager.loggerDict if n.split(".")[0] == "pynetdicom"]
    for name in names:
        logging.getLogger(name).addFilter(_ONE_LINE_ERRORS)


# PDU types (PS3.8 9.3.1) and the A-ABORT a refused PDU gets: source 2 (service provider),
# reason 6 (invalid PDU parameter value) or 2 (unexpected PDU).
ASSOCIATE_RQ = 0x01
_PDU_HEADER = struct.Struct(">BBL")
_ABORT = struct.Struct(">BBLBBBB")
_INVALID_PARAMETER, _UNEXPECTED_PDU = 0x06, 0x02
Refused = Callable[[str, str, str], None]
"""Told of a connection refused: (reason code, peer address, what the peer did: "sent ...",
"failed the TLS handshake ...")."""
# Seconds a peer has to complete the TLS handshake once connected.
TLS_HANDSHAKE_SECONDS = 30.0


class PduGate:
    """Follows the PDU boundaries of what a connection reads (PS3.8 9.3.1: a type byte, a
    reserved byte, a 4-byte length, the body) and refuses a PDU before its body:

    - one declaring more than ``max_pdu`` bytes (the maximum the receiver announces, and a
      bound for the A-ASSOCIATE-RQ that comes before any announcement);
    - a first PDU that is not an A-ASSOCIATE-RQ (nothing is read before an association).

    The peer then gets an A-ABORT, and every read returns nothing: pynetdicom sees the
    connection closed (Evt17), ends the association and closes the socket. Memory per
    association stays bounded by ``max_pdu`` whatever a peer declares. ``on_refused`` is told.
    The connection's socket class reads through it (:class:`BoundedSocket`,
    :class:`BoundedTLSSocket`).
    """

    def __init__(self, sock: socket.socket, max_pdu: int, on_refused: Refused | None) -> None:
        self.sock, self.max_pdu, self.on_refused = sock, max_pdu, on_refused
        self._head, self._body_left, self._first, self._refused = bytearray(), 0, True, False

    def recv(self, read: Callable[[], bytes]) -> bytes:
        """What ``read()`` returns, or nothing once a PDU was refused."""
        if self._refused:
            return b""
        data = read()
        return data if self._follow(memoryview(data)) else b""

    def recv_into(self, buffer: WriteableBuffer, read_into: Callable[[], int]) -> int:
        """``read_into()``'s count of bytes read into ``buffer``, or 0 once a PDU was refused."""
        if self._refused:
            return 0
        count = read_into()
        return count if self._follow(memoryview(buffer)[:count]) else 0

    def _follow(self, data: memoryview) -> bool:
        """Move through ``data`` (next bytes of the stream); False if a PDU was refused."""
        offset = 0
        while offset < len(data):
            if self._body_left:
                step = min(self._body_left, len(data) - offset)
                self._body_left -= step
                offset += step
                continue
            piece = data[offset : offset + _PDU_HEADER.size - len(self._head)]
            self._head += piece
            offset += len(piece)
            if len(self._head) < _PDU_HEADER.size:
                return True
            kind, _, length = _PDU_HEADER.unpack(self._head)
            self._head.clear()
            if not self._allowed(kind, length):
                return False
            self._body_left = length
        return True

    def _allowed(self, kind: int, length: int) -> bool:
        first, self._first = self._first, False
        if first and kind != ASSOCIATE_RQ:
            what, reason = (
                f"a first PDU of type 0x{kind:02X}, not an A-ASSOCIATE-RQ",
                _UNEXPECTED_PDU,
            )
        elif length > self.max_pdu:
            what = f"a PDU (type 0x{kind:02X}) of {length} bytes, over the {self.max_pdu} accepted"
            reason = _INVALID_PARAMETER
        else:
            return True
        self._refused = True
        with contextlib.suppress(OSError):  # the peer is gone already: nothing to tell it
            self.sock.sendall(_ABORT.pack(0x07, 0, 4, 0, 0, 0x02, reason))
        if self.on_refused is not None:
            self.on_refused(
                PDU_TOO_LARGE,
                _address(self.sock),
                f"sent {what}; the connection was aborted before reading it "
                "(RADFLOW_RECEIVER_MAX_PDU_BYTES)",
            )
        return False


class BoundedSocket(socket.socket):
    """A peer's plain TCP connection, read through its :class:`PduGate`. Peeks (``MSG_PEEK``)
    are the fast path's and consume nothing."""

    gate: PduGate

    @classmethod
    def adopt(
        cls, connection: socket.socket, max_pdu: int, on_refused: Refused | None
    ) -> BoundedSocket:
        """Wrap an accepted connection (the same descriptor, now read through this class)."""
        sock = cls(connection.family, connection.type, connection.proto, connection.detach())
        sock.gate = PduGate(sock, max_pdu, on_refused)
        return sock

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if flags & socket.MSG_PEEK:
            return super().recv(bufsize, flags)
        return self.gate.recv(functools.partial(super().recv, bufsize, flags))

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0) -> int:
        if flags & socket.MSG_PEEK:
            return super().recv_into(buffer, nbytes, flags)
        return self.gate.recv_into(
            buffer, functools.partial(super().recv_into, buffer, nbytes, flags)
        )


class BoundedTLSSocket(ssl.SSLSocket):
    """A peer's TLS connection, its decrypted stream read through its :class:`PduGate`.

    The class of every socket the receiver's TLS context wraps (``SSLContext.sslsocket_class``,
    set by :class:`AssociationListener`); the gate is set once the connection is accepted.
    """

    gate: PduGate

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        return self.gate.recv(functools.partial(super().recv, buflen, flags))

    def recv_into(self, buffer: WriteableBuffer, nbytes: int | None = None, flags: int = 0) -> int:
        return self.gate.recv_into(
            buffer, functools.partial(super().recv_into, buffer, nbytes, flags)
        )


def _address(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "unknown peer"
    return f"{host}:{port}"


class AssociationListener(ThreadedAssociationServer):
    """pynetdicom's threaded association server, on its own address or on a shared socket.

    With ``listen_fd``, it accepts from the listening socket the supervisor (receiver/workers.py)
    opened and handed down: every worker waits on it and the first free one takes the next
    connection, so the load follows the workers' actual business (SO_REUSEPORT would spread
    connections by address hash instead, and two of four senders on one worker is then as
    likely as not).

    A connection's thread (its TLS handshake, then pynetdicom's association set-up) neither
    holds up a stop nor the process's exit: the association runs in a thread of its own.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        *args: Any,
        listen_fd: int | None = None,
        max_pdu: int,
        on_refused: Refused | None = None,
        **kwargs: Any,
    ) -> None:
        self.listen_fd = listen_fd
        self.max_pdu, self.on_refused = max_pdu, on_refused
        super().__init__(*args, **kwargs)
        if self.ssl_context is not None:
            self.ssl_context.sslsocket_class = BoundedTLSSocket

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
        """The next connection, bounded (:class:`PduGate`), with its TLS handshake still to do.

        Not pynetdicom's, which does the handshake here, in the one thread that accepts every
        connection: a peer that connects and sends nothing (or a plain DICOM peer that waits
        for an answer) would hold up every other sender. :meth:`finish_request` does it, in
        the connection's own thread.
        """
        assert self.socket is not None, "the server has a listening socket"
        connection, address = self.socket.accept()
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is None:
            return BoundedSocket.adopt(connection, self.max_pdu, self.on_refused), address
        tls = self.ssl_context.wrap_socket(
            connection, server_side=True, do_handshake_on_connect=False
        )
        assert isinstance(tls, BoundedTLSSocket), "set as the context's socket class"
        tls.gate = PduGate(tls, self.max_pdu, self.on_refused)
        return tls, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Serve one connection (in its own thread): the TLS handshake first, if TLS is on."""
        if isinstance(request, ssl.SSLSocket) and not self._handshake(request):
            return
        super().finish_request(request, client_address)

    def _handshake(self, connection: ssl.SSLSocket) -> bool:
        """Complete the TLS handshake within :data:`TLS_HANDSHAKE_SECONDS`; if it fails, close
        the connection, tell ``on_refused`` (a peer that closes without sending anything, such
        as a port check, is only logged) and say False."""
        peer = _address(connection)
        timeout = connection.gettimeout()
        connection.settimeout(TLS_HANDSHAKE_SECONDS)
        try:
            connection.do_handshake()
        except OSError as exc:  # ssl.SSLError and a timeout included
            connection.close()
            if isinstance(exc, ssl.SSLEOFError | ConnectionResetError):
                logger.debug("%s closed the connection before a TLS handshake", peer)
            elif self.on_refused is not None:
                self.on_refused(
                    TLS_HANDSHAKE_FAILED,
                    peer,
                    f"failed the TLS handshake ({describe(exc)}); this port accepts DICOM TLS "
                    "only: a sender without TLS, one whose certificate is missing or not signed "
                    "by an authority in RADFLOW_RECEIVER_TLS_CA_FILE (mutual TLS), or one that "
                    "does not trust the receiver's certificate is refused",
                )
            return False
        connection.settimeout(timeout)
        return True

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
    on_refused: Refused | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_class: type[AssociationListener] = AssociationListener,
    **options: Any,
) -> AssociationListener:
    """Start ``ae``'s association server in a background thread.

    On ``address``, or on the inherited listening socket ``listen_fd`` (a worker's); PDUs are
    bounded by ``ae.maximum_pdu_size`` (``on_refused`` is told of a refused PDU, and of a failed
    TLS handshake); with ``ssl_context`` (radflow/ingest/receiver/tls.py) every connection is
    TLS. ``server_class`` and ``options`` (``request_handler=`` and the server class's own
    arguments) go to ``AE.make_server``.
    """
    server = ae.make_server(
        address,
        ssl_context=ssl_context,
        evt_handlers=evt_handlers,
        server_class=server_class,
        listen_fd=listen_fd,
        max_pdu=ae.maximum_pdu_size,
        on_refused=on_refused,
        **options,
    )
    assert isinstance(server, AssociationListener)
    thread = threading.Thread(
        target=server.serve_forever, name="radflow-dicom-acceptor", daemon=True
    )
    thread.start()
    return server
