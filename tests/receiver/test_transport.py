"""The receiver's socket reads whole PDUs in large pieces, and never trusts a declared length."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from pynetdicom import AE
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association

from radflow.receiver.transport import READ_CHUNK, BulkReadSocket


@pytest.fixture
def connection() -> Iterator[tuple[BulkReadSocket, socket.socket]]:
    ours, peer = socket.socketpair()
    wrapped = BulkReadSocket(Association(AE(), MODE_ACCEPTOR), client_socket=ours)
    yield wrapped, peer
    ours.close()
    peer.close()


def _send_slowly(peer: socket.socket, data: bytes, piece: int, close: bool) -> threading.Thread:
    def run() -> None:
        for start in range(0, len(data), piece):
            peer.sendall(data[start : start + piece])
        if close:
            peer.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_reads_exactly_the_requested_bytes_across_many_small_sends(
    connection: tuple[BulkReadSocket, socket.socket],
) -> None:
    wrapped, peer = connection
    pdu, following = os.urandom(3 * READ_CHUNK + 12345), b"next PDU"
    sender = _send_slowly(peer, pdu + following, piece=7000, close=False)
    assert wrapped.recv(len(pdu)) == pdu
    assert wrapped.recv(len(following)) == following  # nothing of the next PDU was consumed
    sender.join()


def test_short_read_when_the_peer_closes_and_no_allocation_for_a_declared_length(
    connection: tuple[BulkReadSocket, socket.socket],
) -> None:
    wrapped, peer = connection
    sender = _send_slowly(peer, b"x" * 1000, piece=100, close=True)
    # A PDU header may claim up to 4 GiB: only the 1000 bytes that arrive are ever held.
    assert wrapped.recv(0xFFFFFFFF) == b"x" * 1000
    sender.join()


def test_ready_wakes_when_data_arrives_and_times_out_without(
    connection: tuple[BulkReadSocket, socket.socket],
) -> None:
    wrapped, peer = connection
    wrapped._is_connected = True
    start = time.monotonic()
    assert not wrapped.ready  # nothing sent: False after at most READY_WAIT
    assert time.monotonic() - start < 1.0
    peer.sendall(b"\x04")
    assert wrapped.ready
    assert wrapped.recv(1) == b"\x04"


def test_sends_from_two_threads_never_interleave(
    connection: tuple[BulkReadSocket, socket.socket],
) -> None:
    wrapped, peer = connection
    pdus = [bytes([n]) * 300_000 for n in (1, 2)]
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(_read(peer, 600_000)))
    reader.start()
    senders = [threading.Thread(target=wrapped.send, args=(pdu,)) for pdu in pdus]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    reader.join()
    assert bytes(received) in (pdus[0] + pdus[1], pdus[1] + pdus[0])


def _read(peer: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        data += peer.recv(n - len(data))
    return bytes(data)
