"""Property over the network: whatever data set a sender sends, the receiver answers with a
status, refuses only with a reason it records, never stops, and the valid instance sent next
in the same association is indexed.

The data sets are tests/spoil.py's (the strategy that fuzzes read_header in tests/dicom: valid
instances with bytes flipped, cut, inserted or deleted, length fields and values rewritten,
sequences nested hundreds deep, the transfer syntax claimed wrongly), each sent as a C-STORE
under the transfer syntax it claims, with its instance's own UIDs in the command. A bounded
number of examples from a fixed seed in ``make test``; more, locally, with a fresh seed:

    RADFLOW_RECEIVER_FUZZ_EXAMPLES=500 .venv/bin/python -m pytest tests/ingest/receiver/test_fuzz.py
"""

from __future__ import annotations

import itertools
import os

import pytest
from factories import dicom_bytes
from hypothesis import HealthCheck, event, given, settings
from raw import ASSOCIATE_AC, VERIFICATION, RawPeer, accepted_contexts, send_store, split_part10
from spoil import Spoilt, data_sets
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import Instance, Rejection
from radflow.errors import VALUE_DROPPED
from radflow.ingest.receiver import FAILURE_STATUS, Receiver, failure_status
from radflow.ingest.receiver.statuses import ASSOCIATION_REJECT, UNPROCESSABLE

EXAMPLES = int(os.environ.get("RADFLOW_RECEIVER_FUZZ_EXAMPLES", "30"))
CI = "RADFLOW_RECEIVER_FUZZ_EXAMPLES" not in os.environ
KNOWN_REASONS = {*FAILURE_STATUS, *ASSOCIATION_REJECT, VALUE_DROPPED}


def _contexts(sent: Spoilt, good: bytes) -> list[tuple[int, str, list[str]]]:
    """The spoilt data set's context (1), the valid instance's (3), verification (5)."""
    good_class, _, good_syntax, _ = split_part10(good)
    return [
        (1, sent.base.uids[0], [sent.syntax]),
        (3, good_class, [good_syntax]),
        (5, VERIFICATION, [good_syntax]),
    ]


def _rows(session_factory: sessionmaker[Session], origin: str) -> list[str]:
    with session_factory() as session:
        return list(session.scalars(select(Rejection.reason).where(Rejection.origin == origin)))


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's, about the values it converts
def test_any_data_set_gets_a_status_and_the_next_instance_is_indexed(
    receiver: Receiver, session_factory: sessionmaker[Session]
) -> None:
    callers = (f"FUZZ{n}" for n in itertools.count())
    valid: list[str] = []

    @settings(
        max_examples=EXAMPLES,
        derandomize=CI,
        database=None if CI else settings.default.database,
        deadline=None,  # a C-STORE waits for an fsync: its time is the disk's
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(sent=data_sets())
    def example(sent: Spoilt) -> None:
        good = dicom_bytes()
        valid.append(split_part10(good)[1])
        calling = next(callers)
        with RawPeer(receiver.port) as peer:
            reply = peer.associate(calling=calling, contexts=_contexts(sent, good))
            if reply.kind != ASSOCIATE_AC:  # a context without a transfer syntax
                (reason,) = _rows(session_factory, calling)
                assert reply.rejection == ASSOCIATION_REJECT[reason]
                event(reason)
                assert send_store(receiver.port, good) == 0x0000
                return
            if accepted_contexts(reply.body)[1] == 0:
                status = peer.store(good, command_uids=sent.base.uids, dataset=sent.body)
                assert status is not None, "the association broke"
                refused = _rows(session_factory, calling)
                assert [failure_status(r) for r in refused] == ([] if status == 0 else [status])
                event(refused[0] if refused else "acknowledged")
            else:
                event("transfer syntax not accepted")
            assert peer.store(good, context_id=3, message_id=2) == 0x0000
            assert peer.echo(context_id=5) == 0x0000
            assert peer.release()
        assert receiver.indexer.alive

    example()
    assert receiver.wait_indexed(60)
    assert receiver.indexer.alive
    with session_factory() as session:
        for uid in valid:
            query = select(func.count()).select_from(Instance)
            assert session.scalar(query.where(Instance.sop_instance_uid == uid)) == 1
        reasons = set(session.scalars(select(Rejection.reason)))
    assert reasons <= KNOWN_REASONS
    assert UNPROCESSABLE not in reasons, "an unforeseen failure: see the log's traceback"
    assert not list(receiver.spool.ready.iterdir())
