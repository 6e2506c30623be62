"""The receiver's socket reads whole PDUs in large pieces, and never trusts a declared length."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from peers import echoscu
from pydicom.uid import CTImageStorage
from pynetdicom import AE
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association

from radflow.ingest.receiver import Receiver
from radflow.ingest.receiver.transport import READ_CHUNK, BulkReadSocket, presentation_data_values


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


def test_peek_leaves_the_bytes_and_recv_exactly_fills_one_buffer(
    connection: tuple[BulkReadSocket, socket.socket],
) -> None:
    wrapped, peer = connection
    pdu = os.urandom(2 * READ_CHUNK + 99)
    sender = _send_slowly(peer, pdu, piece=5000, close=True)
    while wrapped.peek(6) is None:  # not 6 bytes yet
        time.sleep(0.001)
    assert wrapped.peek(6) == pdu[:6]
    assert wrapped.recv_exactly(len(pdu)) == pdu
    assert wrapped.recv_exactly(1) is None  # the peer closed: no byte left
    sender.join()


def _pdv(context_id: int, header: int, data: bytes) -> bytes:
    return struct.pack(">LBB", 2 + len(data), context_id, header) + data


def test_presentation_data_values_are_views_of_each_item() -> None:
    body = _pdv(1, 0x03, b"command") + _pdv(3, 0x02, os.urandom(1000)) + _pdv(5, 0x00, b"")

    pdvs = presentation_data_values(memoryview(body))

    assert pdvs is not None
    assert [(cid, bytes(data)) for cid, data in pdvs] == [
        (1, b"\x03command"),
        (3, b"\x02" + body[-1006:-6]),
        (5, b"\x00"),
    ]


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no item
        struct.pack(">LB", 1, 1),  # an item with no message control header
        _pdv(1, 0x02, b"data")[:-1],  # the item runs past the PDU
        _pdv(1, 0x02, b"data") + b"\x00\x00",  # bytes left that are not an item
    ],
    ids=["empty", "no-header", "overrun", "trailing"],
)
def test_malformed_presentation_data_values_are_refused(body: bytes) -> None:
    assert presentation_data_values(memoryview(body)) is None


def test_a_malformed_p_data_pdu_aborts_that_association_only(receiver: Receiver) -> None:
    ae = AE(ae_title="BROKEN")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="RADFLOW")
    assert assoc.is_established
    item = struct.pack(">LB", 9, 1) + b"\x02data"  # declares 9 bytes, holds 6
    assoc.dul.socket.send(struct.pack(">BBL", 0x04, 0, len(item)) + item)

    deadline = time.monotonic() + 10
    while not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert assoc.is_aborted  # the receiver sent an A-ABORT
    assert echoscu(receiver.port).returncode == 0  # and serves the next association
