"""Several receiver processes on one port (RADFLOW_RECEIVER_WORKERS), one index behind them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from factories import dicom_bytes
from peers import AE_TITLE, echoscu, free_port, peer_env, radflow_env, tool, wait_for_port
from pydicom.uid import generate_uid
from servers import PrefectServer
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import Instance
from radflow.ingest.receiver import Receiver, drain_orphans, worker_spool
from radflow.ingest.receiver.workers import open_listener
from radflow.services.status import receiver_status
from radflow.settings import Settings
from radflow.store import ObjectStore

SERIES, PER_SERIES = 4, 10


def _series(folder: Path) -> list[Path]:
    folders = []
    study = generate_uid()
    for k in range(SERIES):
        sub = folder / f"series-{k}"
        sub.mkdir(parents=True)
        series = generate_uid()
        for i in range(PER_SERIES):
            (sub / f"{i:02d}.dcm").write_bytes(dicom_bytes(study_uid=study, series_uid=series))
        folders.append(sub)
    return folders


def _send_in_parallel(port: int, folders: list[Path]) -> None:
    command = [tool("/usr/bin/storescu"), "-aec", AE_TITLE, "127.0.0.1", str(port), "+sd"]
    senders = [
        subprocess.Popen([*command, str(f)], env=peer_env(), stderr=subprocess.PIPE, text=True)
        for f in folders
    ]
    for sender in senders:
        _, err = sender.communicate(timeout=120)
        assert sender.returncode == 0, err


def _indexed(session_factory: sessionmaker[Session], expected: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while True:
        with session_factory() as session:
            count = int(session.scalar(select(func.count()).select_from(Instance)) or 0)
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.2)


def _wait_for_spools(settings: Settings, n: int, supervisor: subprocess.Popen[bytes]) -> None:
    """Until each of ``n`` workers has made its spool folder (it started receiving): on a busy
    machine the port answers (the supervisor's socket) before the second worker has started."""
    deadline = time.monotonic() + 60
    while not all(worker_spool(settings.spool, k).is_dir() for k in range(n)):
        assert supervisor.poll() is None, "the receiver exited"
        assert time.monotonic() < deadline, "the workers never started"
        time.sleep(0.2)


def _workers_of(pid: int) -> set[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return {int(line) for line in found.stdout.split()}


def test_workers_share_the_port_and_a_dead_worker_is_replaced(
    receiver_settings: Settings, tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    settings = receiver_settings.model_copy(update={"receiver_workers": 2})
    port = free_port()
    command = [sys.executable, "-m", "cli.main", "receive", "--port", str(port)]
    supervisor = subprocess.Popen(command, env=radflow_env(settings))
    try:
        wait_for_port(port, supervisor)  # the supervisor's socket: its workers may still start
        _wait_for_spools(settings, 2, supervisor)
        _send_in_parallel(port, _series(tmp_path / "first"))
        assert _indexed(session_factory, SERIES * PER_SERIES) == SERIES * PER_SERIES
        workers = _workers_of(supervisor.pid)
        assert len(workers) == 2
        assert all(worker_spool(settings.spool, k).is_dir() for k in range(2))
        with session_factory() as session:
            status = receiver_status(session, settings)
        # The counters are saved when a worker's indexer is idle: summed over both spools.
        deadline = time.monotonic() + 10
        while status["indexed"] < SERIES * PER_SERIES and time.monotonic() < deadline:
            time.sleep(0.2)
            with session_factory() as session:
                status = receiver_status(session, settings)
        assert status["received"] == status["indexed"] == SERIES * PER_SERIES
        assert status["spool_waiting"] == 0

        victim = min(workers)
        subprocess.run(["kill", "-9", str(victim)], check=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = _workers_of(supervisor.pid)
            if len(now) == 2 and victim not in now:
                break
            time.sleep(0.2)
        assert len(now) == 2 and victim not in now, "the supervisor restarts a dead worker"
        _send_in_parallel(port, _series(tmp_path / "second"))
        assert _indexed(session_factory, 2 * SERIES * PER_SERIES) == 2 * SERIES * PER_SERIES
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(60)
    assert supervisor.returncode == 0
    assert not _workers_of(supervisor.pid)


def test_a_spool_no_worker_owns_is_indexed_at_start(
    settings: Settings,
    tmp_path: Path,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
) -> None:
    """Fewer workers than last time: what waits in the spool of a worker gone is not lost."""
    orphan = worker_spool(settings.spool, 3) / "ready"
    orphan.mkdir(parents=True)
    for i in range(3):
        (orphan / f"1.2.3.{i}.abc.dcm").write_bytes(dicom_bytes())
    drain_orphans(settings, {settings.spool}, session_factory=session_factory, store=store)
    assert _indexed(session_factory, 3, timeout=0) == 3
    assert not list(orphan.iterdir())


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_a_worker_that_stops_leaves_the_shared_socket_to_the_others(
    receiver_settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
) -> None:
    """One worker stopped alone (SIGTERM from an operator): the others keep accepting, and so
    would the worker the supervisor starts in its place."""
    listener = open_listener("127.0.0.1", 0)
    workers = [
        Receiver(
            receiver_settings,
            session_factory=session_factory,
            store=store,
            spool=worker_spool(receiver_settings.spool, k),
            listen_fd=os.dup(listener.fileno()),  # each worker process has its own descriptor
        )
        for k in range(2)
    ]
    for worker in workers:
        worker.start()
    try:
        workers[0].stop()
        assert echoscu(workers[1].port).returncode == 0
    finally:
        workers[1].stop()
        listener.close()


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
@pytest.mark.parametrize("receiver_path", ["fast"], indirect=True)
def test_the_receiver_logs_where_it_listens_and_the_events_it_emits(
    receiver_settings: Settings, tmp_path: Path, no_waiting_runs: PrefectServer
) -> None:
    """Defect 5: workers logged ``listening on 0.0.0.0`` (their settings) while bound to the
    127.0.0.1 of ``--host``; the stable-study event never showed in the log."""
    settings = receiver_settings.model_copy(
        update={"receiver_workers": 2, "receiver_host": "0.0.0.0", "stable_after_seconds": 0.2}
    )
    port = free_port()
    command = [sys.executable, "-m", "cli.main", "receive", "--host", "127.0.0.1"]
    log = tmp_path / "receive.log"
    with log.open("wb") as out:
        supervisor = subprocess.Popen(
            [*command, "--port", str(port)],
            env={**radflow_env(settings), **no_waiting_runs.env()},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, supervisor)
        _send_in_parallel(port, _series(tmp_path / "study")[:1])
        deadline = time.monotonic() + 60
        while "radflow.study.stable event emitted" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(60)
    text = log.read_text()
    assert text.count(f"listening on 127.0.0.1:{port}") == 2, text
    assert "0.0.0.0" not in text
