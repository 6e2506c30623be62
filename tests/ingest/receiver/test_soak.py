"""Soak: valid and malformed instances mixed over several associations, the receiver restarted
in the middle with instances still waiting in its spool, and a sender re-sending what it sent
just before the restart. At the end every valid acknowledged instance is indexed exactly once,
every malformed one has a Rejection row, and nothing is left waiting."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from bad_inputs import failing_unforeseen
from factories import dicom_bytes
from malformed import POISON, REFUSED
from raw import ASSOCIATE_AC, RawPeer, split_part10
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import Instance, Rejection
from radflow.ingest.receiver import Receiver, failure_status
from radflow.services.status import receiver_status

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the bad files

ASSOCIATIONS = 6  # the receiver restarts after the third


def _made(make: Callable[[], bytes]) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make()


def _malformed() -> dict[str, tuple[bytes, tuple[str, str] | None]]:
    """Name -> (Part 10 file, the command's UIDs if not the file's)."""
    cases = {name: _made(make) for name, make in {**REFUSED, **POISON}.items()}
    unforeseen = failing_unforeseen()  # its vr.dcm spoils the file meta: no sender sends that
    cases |= {name: unforeseen[name] for name in ("deflate.dcm", "odd.dcm")}
    cases["truncated"] = dicom_bytes(np.ones((64, 64), np.uint16))[:-3000]
    text = dicom_bytes()
    cases["text"] = text[: len(text) - len(split_part10(text)[3])] + b"Doe^John chest PA\n" * 40
    found = {name: (data, None) for name, data in cases.items()}
    other = dicom_bytes()
    found["command-uid-mismatch"] = (other, (split_part10(other)[0], "1.2.3.4.5.6"))
    return found


@dataclass
class Sent:
    name: str
    uid: str
    calling: str
    status: int | None


def _stream() -> Iterator[tuple[str, bytes, tuple[str, str] | None]]:
    """Each malformed instance followed by a valid one, then valid ones to round it off."""
    for n, (name, (data, command)) in enumerate(_malformed().items()):
        yield name, data, command
        yield f"valid-{n}", dicom_bytes(), None
    for n in range(6):
        yield f"valid-tail-{n}", dicom_bytes(), None


def _send(
    receiver: Receiver, calling: str, items: list[tuple[str, bytes, tuple[str, str] | None]]
) -> list[Sent]:
    sent = []
    with RawPeer(receiver.port) as peer:
        assert peer.associate(calling=calling).kind == ASSOCIATE_AC
        for n, (name, data, command) in enumerate(items):
            status = peer.store(data, message_id=n + 1, command_uids=command)
            assert status is not None, f"{name}: the association broke"
            sent.append(Sent(name, split_part10(data)[1], calling, status))
        assert peer.release()
    return sent


def _status_while_stopped(session_factory: sessionmaker[Session], receiver: Receiver) -> None:
    """`radflow status` between the two runs: the backlog, its age, and why nothing is taken."""
    with session_factory() as session:
        status = receiver_status(session, receiver.settings)
    assert status["spool_waiting"] == receiver.spool.count()
    assert status["oldest_waiting_seconds"] >= 0
    assert status["indexers"]["."]["state"] == "stopped"
    assert not status["accepting"]
    assert "no receiver runs" in status["not_accepting_because"]


def test_a_mixed_stream_with_a_restart_indexes_each_valid_instance_once(
    start_receiver: Callable[..., Receiver], session_factory: sessionmaker[Session]
) -> None:
    stream = list(_stream())
    chunks = [stream[k::ASSOCIATIONS] for k in range(ASSOCIATIONS)]
    receiver = start_receiver()
    # Indexing deferred as while senders keep sending: the restart finds instances waiting.
    receiver.indexer.quiet_seconds = 60.0
    sent: list[Sent] = []
    for k, chunk in enumerate(chunks):
        if k == ASSOCIATIONS // 2:
            # Stopped with instances still waiting, and started again on the same spool.
            receiver.stop()
            assert receiver.spool.count() > 0, "nothing was left waiting: no restart tested"
            _status_while_stopped(session_factory, receiver)
            receiver = start_receiver()
            # The sender re-sends what it sent last before the restart: stored once all the same.
            sent += _send(receiver, "SOAK-RESEND", chunks[k - 1])
        sent += _send(receiver, f"SOAK{k}", chunk)
    assert receiver.wait_indexed(60)

    valid = [s for s in sent if s.name.startswith("valid")]
    assert all(s.status == 0x0000 for s in valid), [s for s in valid if s.status]
    with session_factory() as session:
        for s in valid:
            query = select(func.count()).select_from(Instance)
            assert session.scalar(query.where(Instance.sop_instance_uid == s.uid)) == 1, s.name
        for calling in {s.calling for s in sent}:
            refused = [s for s in sent if s.calling == calling and s.status]
            rows = session.scalars(
                select(Rejection.reason).where(
                    Rejection.source == "receiver", Rejection.origin == calling
                )
            )
            assert sorted(map(failure_status, rows)) == sorted(s.status for s in refused), calling
        for s in sent:
            if s.name.startswith("valid") or s.status:
                continue
            # Acknowledged, then indexed without a value (a warning row) or set aside.
            where = or_(Rejection.origin.contains(s.uid), Rejection.quarantine_key.contains(s.uid))
            assert session.scalars(select(Rejection).where(where)).first() is not None, s.name
        status = receiver_status(session, receiver.settings)
    assert {s.name for s in sent if s.status} >= set(REFUSED)
    assert status["spool_waiting"] == 0 and status["oldest_waiting_seconds"] is None
    assert status["accepting"]
    assert not list(receiver.spool.ready.iterdir())
