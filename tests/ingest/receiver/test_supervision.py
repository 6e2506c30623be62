"""Should the indexer thread die anyway (a bug outside any one file's processing), the receiver
stops acknowledging what it could no longer index, says so in ``radflow status``, and
``radflow receive`` exits non-zero for its supervisor to restart it.

The indexer is killed the way a bug would kill it, with no file to blame: its spool's ``ready/``
folder is replaced by a file, so listing it raises NotADirectoryError (not an outage)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from factories import dicom_bytes
from peers import radflow_env
from raw import ASSOCIATE_AC, RawPeer, send_store
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from waiting import eventually

from cli.main import main as radflow
from radflow.db import Rejection
from radflow.ingest.receiver import Receiver
from radflow.ingest.receiver.counters import load_counters
from radflow.services.status import receiver_status
from radflow.settings import Settings


def _break_ready(spool: Path) -> None:
    """Replace the (empty) ``ready/`` folder by a file."""
    (spool / "ready").rmdir()
    (spool / "ready").write_bytes(b"")


def test_a_dead_indexer_stops_acknowledgements(
    receiver: Receiver, session_factory: sessionmaker[Session]
) -> None:
    """0xA700 on an open association, a transient A-ASSOCIATE-RJ for a new one, a Rejection
    row for each, and ``radflow status`` says why; nothing is acknowledged and left unindexed."""
    assert send_store(receiver.port, dicom_bytes()) == 0x0000
    assert receiver.wait_indexed(30)
    with RawPeer(receiver.port) as open_before:
        assert open_before.associate().kind == ASSOCIATE_AC
        _break_ready(receiver.spool.root)
        assert eventually(lambda: receiver.indexer.failure is not None)
        assert not receiver.indexer.alive
        assert open_before.store(dicom_bytes()) == 0xA700
        with RawPeer(receiver.port) as late:
            assert late.associate().rejection == (2, 3, 1)
        assert open_before.echo() == 0x0000  # verification still answers
    with session_factory() as session:
        reasons = list(session.scalars(select(Rejection.reason)))
        status = receiver_status(session, receiver.settings)
    assert reasons == ["indexer-down", "indexer-down"]
    assert not status["accepting"]
    assert "NotADirectoryError" in status["not_accepting_because"]
    (health,) = status["indexers"].values()
    assert health["state"] == "dead" and not health["alive"]
    assert "NotADirectoryError" in health["last_error"]


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_radflow_receive_exits_non_zero_when_its_indexer_dies(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`radflow receive` (in this process) returns 2 with a message that says what to do,
    within seconds of the indexer's death: a supervisor (systemd, Docker, the worker
    supervisor) then restarts it."""
    for name, value in radflow_env(settings).items():
        if name.startswith("RADFLOW_"):
            monkeypatch.setenv(name, value)
    stats = settings.spool / "stats.json"

    def break_once_running() -> None:
        running = eventually(
            lambda: (load_counters(stats) or {}).get("indexer", {}).get("state") == "running", 60
        )
        assert running
        _break_ready(settings.spool)

    breaker = threading.Thread(target=break_once_running, daemon=True)
    breaker.start()
    started = time.monotonic()
    code = radflow(["receive", "--port", "0"])
    breaker.join(5)
    assert code == 2
    assert time.monotonic() - started < 60
    message = capsys.readouterr().err
    assert "indexer stopped (NotADirectoryError" in message
    assert "start it again" in message
    assert (load_counters(stats) or {})["indexer"]["state"] == "dead"
