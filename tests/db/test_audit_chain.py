"""The audit trail is a hash chain the database will not let anyone edit or delete from."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from alembic import command
from sqlalchemy import JSON, DateTime, Engine, column, delete, insert, select, table, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from cli.main import main
from radflow.db import AuditEvent, unit_of_work
from radflow.db.audit import AuditChainHead, record
from radflow.db.session import alembic_config
from radflow.services.audit import verify_chain
from radflow.settings import Settings


def _add(factory: sessionmaker[Session], n: int, actor: str = "rita") -> None:
    for i in range(n):
        with unit_of_work(factory) as session:
            session.add(record(actor, "view", "study", f"1.2.3.{i}", note={"i": i}))


def _report(factory: sessionmaker[Session]) -> list[str]:
    with factory() as session:
        return verify_chain(session).problems


def test_every_event_links_to_the_one_before(session_factory: sessionmaker[Session]) -> None:
    _add(session_factory, 3)
    with unit_of_work(session_factory) as session:  # several events in one transaction
        session.add_all([record("max", "promote", "model_version", f"t:v{i}") for i in (1, 2)])
    with session_factory() as session:
        events = session.scalars(select(AuditEvent).order_by(AuditEvent.seq)).all()
        report = verify_chain(session)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert all(e.prev_hash == before.hash for before, e in itertools.pairwise(events))
    assert report.intact and report.events == 5
    assert (report.head_seq, report.head_hash) == (5, events[-1].hash)


def test_the_database_refuses_to_change_or_delete_events(
    session_factory: sessionmaker[Session],
) -> None:
    _add(session_factory, 2)
    for statement in (
        update(AuditEvent).where(AuditEvent.seq == 1).values(actor="someone-else"),
        delete(AuditEvent).where(AuditEvent.seq == 2),
        update(AuditChainHead).values(seq=0),
    ):
        refused = pytest.raises(DBAPIError, match=r"append-only|only moves forward")
        with refused, unit_of_work(session_factory) as session:
            session.execute(statement)
    assert _report(session_factory) == []


@pytest.fixture
def without_guards(engine: Engine) -> Iterator[None]:
    """What someone with the database owner's rights can do: switch the triggers off."""
    postgres = engine.dialect.name == "postgresql"
    with engine.begin() as connection:
        if postgres:
            connection.execute(text("ALTER TABLE audit_event DISABLE TRIGGER USER"))
            connection.execute(text("ALTER TABLE audit_chain_head DISABLE TRIGGER USER"))
        else:
            for name in ("audit_event_no_update", "audit_event_no_delete"):
                connection.execute(text(f"DROP TRIGGER {name}"))
    yield


def test_verify_finds_edits_deletions_and_a_cut_end(
    session_factory: sessionmaker[Session], without_guards: None, settings: Settings
) -> None:
    _add(session_factory, 6)
    assert main_verify(settings) == 0
    with unit_of_work(session_factory) as session:
        session.execute(update(AuditEvent).where(AuditEvent.seq == 2).values(actor="mallory"))
    assert _report(session_factory) == ["event 2 (id 2) was changed after it was written"]
    assert main_verify(settings) == 1
    with unit_of_work(session_factory) as session:
        session.execute(update(AuditEvent).where(AuditEvent.seq == 2).values(actor="rita"))
        session.execute(delete(AuditEvent).where(AuditEvent.seq == 4))
    assert _report(session_factory) == ["events 4..4 are missing (deleted?) before id 5"]
    with unit_of_work(session_factory) as session:
        session.execute(delete(AuditEvent).where(AuditEvent.seq >= 4))
    (problem,) = _report(session_factory)
    assert problem.startswith("the chain ends at event 3 but its head says 6")


def main_verify(settings: Settings) -> int:
    """``radflow audit verify`` on these settings (a SQLite data dir)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RADFLOW_DATA_DIR", str(settings.data_dir))
        env.setenv("RADFLOW_DATABASE_URL", settings.database_url)
        env.setenv("RADFLOW_STORE_URL", str(settings.data_dir / "objects"))
        return main(["audit", "verify"])


def test_concurrent_writers_never_fork_the_chain(session_factory: sessionmaker[Session]) -> None:
    start = threading.Barrier(6)

    def write(actor: str) -> None:
        start.wait()
        _add(session_factory, 5, actor)

    threads = [threading.Thread(target=write, args=(f"user{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with session_factory() as session:
        seqs = session.scalars(select(AuditEvent.seq).order_by(AuditEvent.seq)).all()
    assert seqs == list(range(1, 31))
    assert _report(session_factory) == []


def test_the_migration_chains_the_events_already_there_and_downgrades(
    engine: Engine, settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    config = alembic_config(settings.database_url)
    command.downgrade(config, "0007")  # the schema before this chain existed
    events = table(
        "audit_event",
        column("at", DateTime(timezone=True)),
        *(column(name) for name in ("actor", "action", "object_type", "object_id")),
        column("details", JSON()),
    )
    with engine.begin() as connection:
        connection.execute(
            insert(events),
            [
                {
                    "at": datetime(2026, 11, i + 1, 10, tzinfo=UTC),
                    "actor": "rita",
                    "action": "view",
                    "object_type": "study",
                    "object_id": f"1.2.{i}",
                    "details": {"n": i},
                }
                for i in range(3)
            ],
        )
    command.upgrade(config, "heads")
    with session_factory() as session:
        report = verify_chain(session)
    assert report.intact and report.events == 3
    _add(session_factory, 1)  # and the chain goes on from there
    assert _report(session_factory) == []
