"""What a peer cannot make the receiver do: buffer a PDU of any declared length, abort an
association because the spool's disk is full, or leave half-received files behind."""

from __future__ import annotations

import socket
import struct
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from factories import dicom_bytes
from raw import (
    ABORT,
    ASSOCIATE_AC,
    P_DATA_TF,
    RawPeer,
    _max_length,
    command_set,
    pdu,
    pdv,
    send_store,
    split_part10,
    store_command,
)
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from waiting import eventually, leftovers

from radflow.db import Rejection
from radflow.ingest.receiver import Receiver
from radflow.services.status import receiver_status
from radflow.settings import Settings

MIB = 1 << 20


def _reasons(session_factory: sessionmaker[Session]) -> list[str]:
    with session_factory() as session:
        return list(session.scalars(select(Rejection.reason).order_by(Rejection.id)))


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_the_maximum_pdu_length_is_announced(start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver(receiver_max_pdu_bytes=64 * 1024)
    with RawPeer(receiver.port) as peer:
        reply = peer.associate()
        assert reply.kind == ASSOCIATE_AC
        assert _max_length(reply.body) == 64 * 1024


def _flood(sock: socket.socket, total: int) -> threading.Thread:
    """Send ``total`` bytes of junk until the receiver closes the connection."""

    def run() -> None:
        junk = b"\x00" * (256 * 1024)
        sent = 0
        try:
            while sent < total:
                sock.sendall(junk)
                sent += len(junk)
        except OSError:
            return  # closed by the receiver: what the test wants

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# What a peer sends before the flood: the A-ASSOCIATE-RQ declaring 4 GiB, a P-DATA-TF of 1 GiB
# in an established association, a first PDU that is not an A-ASSOCIATE-RQ.
ATTACKS = {
    "associate-rq-4-gib": (False, struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF)),
    "p-data-1-gib": (True, struct.pack(">BBL", P_DATA_TF, 0, 1 << 30)),
    "p-data-first": (False, struct.pack(">BBL", P_DATA_TF, 0, 1000)),
}


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
@pytest.mark.parametrize("attack", ATTACKS)
def test_a_pdu_over_the_maximum_is_refused_before_it_is_read(
    attack: str, receiver: Receiver, session_factory: sessionmaker[Session]
) -> None:
    """The peer gets an A-ABORT and the connection closes at the PDU header: the receiver's
    memory does not grow with the 32 MiB the peer goes on sending."""
    associate, header = ATTACKS[attack]
    tracemalloc.start()
    try:
        with RawPeer(receiver.port) as peer:
            if associate:
                assert peer.associate().kind == ASSOCIATE_AC
            peer.send(header)
            flood = _flood(peer.sock, 32 * MIB)
            reply = peer.read()
            flood.join(30)
            assert not flood.is_alive(), "the receiver kept reading"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply.kind in (ABORT, None)
    assert peak < 8 * MIB
    with RawPeer(receiver.port) as peer:  # and the next association is served
        assert peer.associate().kind == ASSOCIATE_AC
        assert peer.echo() == 0x0000
    assert _reasons(session_factory) == ["pdu-too-large"]


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
@pytest.mark.parametrize("ending", ["a-abort", "reset", "oversized-pdu"])
def test_an_association_ended_mid_dataset_leaves_no_partial_file(
    ending: str, receiver: Receiver
) -> None:
    data = dicom_bytes(np.ones((512, 512), np.uint16))
    sop_class, sop_instance, _, body = split_part10(data)
    with RawPeer(receiver.port) as peer:
        assert peer.associate().kind == ASSOCIATE_AC
        peer.send(pdu(P_DATA_TF, pdv(1, 0x03, command_set(store_command(sop_class, sop_instance)))))
        peer.send(pdu(P_DATA_TF, pdv(1, 0x00, body[:60000])))
        assert eventually(lambda: leftovers(receiver.spool))  # being received
        if ending == "a-abort":
            peer.abort()
        elif ending == "reset":
            peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            peer.send(struct.pack(">BBL", P_DATA_TF, 0, 1 << 30))
    assert eventually(lambda: not leftovers(receiver.spool)), leftovers(receiver.spool)
    assert send_store(receiver.port, dicom_bytes()) == 0x0000
    assert receiver.wait_indexed(30)


def _fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` with one file until ``leave`` bytes stay free."""
    filler = disk / "filler"
    stats = __import__("os").statvfs(disk)
    filler.write_bytes(b"\0" * max(0, stats.f_bavail * stats.f_frsize - leave))
    return filler


def test_a_spool_below_its_free_space_threshold_refuses_associations_and_instances(
    small_disk: Callable[[int], Path],  # first: unmounted after the receiver stopped
    start_receiver: Callable[..., Receiver],
    settings: Settings,
    session_factory: sessionmaker[Session],
) -> None:
    """Under RADFLOW_RECEIVER_MIN_FREE_BYTES free: a new association gets a transient
    A-ASSOCIATE-RJ (temporary congestion), an instance on an open one 0xA701 (out of
    resources), each with a Rejection row; ``radflow status`` shows it; room again, received."""
    disk = small_disk(8 * MIB)
    receiver = start_receiver(spool_dir=disk / "spool", receiver_min_free_bytes=4 * MIB)
    good = dicom_bytes()
    with RawPeer(receiver.port) as early:
        assert early.associate().kind == ASSOCIATE_AC
        filler = _fill(disk, 2 * MIB)
        with RawPeer(receiver.port) as late:
            assert late.associate().rejection == (2, 3, 1)
        assert early.store(good) == 0xA701
        assert early.echo() == 0x0000  # the association lives on
    with session_factory() as session:
        status = receiver_status(session, receiver.settings)
    assert not status["accepting"]
    assert "RADFLOW_RECEIVER_MIN_FREE_BYTES" in status["not_accepting_because"]
    assert _reasons(session_factory) == ["out-of-resources", "out-of-resources"]
    assert not leftovers(receiver.spool)

    filler.unlink()
    assert send_store(receiver.port, good) == 0x0000
    assert receiver.wait_indexed(30)


@pytest.mark.parametrize("receiver_path", ["fast"], indirect=True)
def test_a_disk_that_fills_mid_dataset_gets_out_of_resources_not_an_abort(
    small_disk: Callable[[int], Path],  # first: unmounted after the receiver stopped
    start_receiver: Callable[..., Receiver],
) -> None:
    """ENOSPC while a data set is written (the fast path writes it): the rest of the data set
    is read and dropped, the sender gets 0xA701, the association goes on; once the indexer has
    freed the spool, instances are acknowledged again. (On the plain path pynetdicom writes the
    file and its association aborts: the free-space threshold is what protects it.)"""
    disk = small_disk(2 * MIB)
    receiver = start_receiver(spool_dir=disk / "spool", receiver_min_free_bytes=0)
    statuses = []
    with RawPeer(receiver.port) as peer:
        assert peer.associate().kind == ASSOCIATE_AC
        for _ in range(12):  # ~320 KB each
            statuses.append(peer.store(dicom_bytes(np.ones((400, 400), np.uint16))))
        assert peer.echo() == 0x0000
    assert None not in statuses, statuses  # every C-STORE answered: no abort
    assert 0x0000 in statuses and 0xA701 in statuses, statuses
    assert set(statuses) <= {0x0000, 0xA701}
    assert not leftovers(receiver.spool)

    assert receiver.wait_indexed(30)
    assert eventually(lambda: not list(receiver.spool.done.iterdir()), 10)
    assert send_store(receiver.port, dicom_bytes(np.ones((400, 400), np.uint16))) == 0x0000
