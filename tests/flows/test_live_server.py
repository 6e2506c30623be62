"""The production shape on a live Prefect server (the session's ``prefect server start``).

Each test here covers a way production broke while no test ran against a real server:
schedules that never ran, listings answering 422, a killed worker blocking scoring, stable
studies waiting for an event that was lost (or for a champion that came later), and a burst of
studies flooding the server with cancelled runs.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from factories import make_user
from live import Worker, flow_runs, wait_until, worker_env
from prefect import flow
from prefect.client.orchestration import get_client
from servers import PrefectServer
from sqlalchemy import func, select

from demo.synthetic import write_cxr_studies
from flows import launcher
from flows.deployments import (
    ZOMBIE_AUTOMATION,
    deployments,
    ensure_zombie_automation,
    retrain_deployment,
)
from flows.launcher import (
    LISTENING_TTL,
    PROCESS_DEPLOYMENT,
    labels_recorded,
    listening_run,
    recent_flow_runs,
)
from flows.train import train_flow
from flows.trigger import Handoff, StabiliseResult, stabilise_and_process
from radflow import ingest
from radflow.db import Prediction, Study, StudyStatus, unit_of_work
from radflow.db.base import utcnow
from radflow.learning.labels import add_label
from radflow.learning.training import train_task
from radflow.runtime import Runtime
from radflow.services.users import Role
from radflow.settings import Settings

SCORED_WITHIN = 180.0  # generous: a flow run spawns a fresh Python that imports PyTorch, and the
# server (SQLite) stalls for up to a minute on a loaded machine


@flow(name="heartbeat-check")
def _noop() -> None:
    """A flow for the schedule test; it never needs to run."""


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_a_schedule_creates_runs(flow_env: Settings, prefect_api: PrefectServer) -> None:
    """Defect 1: with SQLAlchemy 2.1 the server's scheduler failed every loop, no run was made."""
    deployment = _noop.to_deployment(name="every-minute", interval=timedelta(minutes=1))
    deployment.apply()
    runs = wait_until(
        lambda: flow_runs("heartbeat-check/every-minute"),
        30,
        lambda: "no scheduled run; server errors:\n" + "\n".join(prefect_api.log_errors()[-20:]),
    )
    assert all(run.state_name == "Scheduled" for run in runs)
    assert not [line for line in prefect_api.log_errors() if "bulk DML" in line]


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_workers_install_the_zombie_run_automation_once(
    flow_env: Settings, prefect_api: PrefectServer
) -> None:
    """Runs a killed worker took down without a lease to hand over stayed Running for good;
    Prefect's zombie recipe (heartbeats, then a proactive trigger) marks them Crashed."""
    from prefect.automations import Automation

    ensure_zombie_automation()
    ensure_zombie_automation()  # a second worker starting
    with get_client(sync_client=True) as client:
        named = [a for a in client.read_automations() if a.name == ZOMBIE_AUTOMATION]
    assert len(named) == 1
    installed = Automation.read(name=ZOMBIE_AUTOMATION)
    assert installed.trigger.posture == "Proactive"
    assert installed.trigger.within == timedelta(seconds=90)
    assert [a.type for a in installed.actions] == ["change-flow-run-state"]


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_flows_and_runs_are_listed(flow_env: Settings, prefect_api: PrefectServer) -> None:
    """Defect 2: listing answered 422 (`prefect flow-run ls`, the pipeline page)."""
    _noop()
    with Runtime.open(flow_env) as rt, unit_of_work(rt.session_factory) as session:
        engineer = make_user(session, "max", Role.ML_ENGINEER)
    rows = recent_flow_runs(engineer)
    assert any(row.flow == "heartbeat-check" and row.state == "Completed" for row in rows)
    env = worker_env(flow_env, prefect_api)
    for command in (["flow-run", "ls"], ["deployment", "ls"], ["automation", "ls"]):
        listed = subprocess.run(
            [str(Path(sys.executable).parent / "prefect"), *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert listed.returncode == 0, (command, listed.stdout[-2000:], listed.stderr[-2000:])


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_enough_label_events_start_the_retrain_deployment(
    flow_env: Settings, prefect_api: PrefectServer, quick_task: str
) -> None:
    retrain_deployment(train_flow, threshold=3).apply()
    since = utcnow()
    labels_recorded(quick_task, 3)
    # The deployment's hourly schedule makes runs of every task too (expected later, so they
    # sort first): only the runs the events started count.
    runs = wait_until(
        lambda: [
            r
            for r in flow_runs("train/retrain", since)
            if r.parameters.get("if_due") and not r.auto_scheduled  # not the hourly catch-up
        ],
        60,
        "3 label events did not start the retrain deployment",
    )
    assert runs[0].parameters["task_name"] == quick_task


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
@pytest.mark.parametrize("score_waiting", [True, False])
def test_a_new_champion_starts_scoring_of_the_studies_that_waited(
    flow_env: Settings,
    process_deployment: None,
    quick_task: str,
    tmp_path: Path,
    score_waiting: bool,
) -> None:
    """Defect 4: studies stable before the first champion were never picked up after it.
    A benchmark that measures scoring itself trains with ``score_waiting=False``."""
    with Runtime.open(flow_env) as rt:
        _labelled_studies(rt, quick_task, tmp_path / "in", 12)
    since = utcnow()
    trained = train_flow(quick_task, progress=False, score_waiting=score_waiting)
    assert trained["status"] == "champion"
    # Not the interval schedule's runs: one started for the studies that waited.
    started = [r for r in flow_runs(PROCESS_DEPLOYMENT, since) if not r.auto_scheduled]
    assert bool(started) == score_waiting, f"process runs started: {started}"


@pytest.fixture
def workers(tmp_path: Path, no_waiting_runs: PrefectServer) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()


@pytest.fixture
def process_deployment(flow_env: Settings, no_waiting_runs: PrefectServer) -> None:
    """The process deployment and its trigger on the server, no worker serving it."""
    for deployment in deployments("process", flow_env):
        deployment.apply()


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_no_event_while_a_run_started_by_one_waits_to_start(
    flow_env: Settings, process_deployment: None, tmp_path: Path
) -> None:
    """Defect 5: a trickle of studies on a busy machine started a process (a new Python
    importing PyTorch) per study, each slowing the others. A run that has not started yet
    reads the database when it does, so it takes the studies that became stable meanwhile."""
    with Runtime.open(flow_env) as rt:
        since = utcnow()
        assert _stabilise(rt, _receive(rt, tmp_path / "first", 1)).emitted
        wait_until(
            lambda: [r for r in flow_runs(PROCESS_DEPLOYMENT, since) if not r.auto_scheduled],
            30,
            "the event started no process run",
        )
        assert not _stabilise(rt, _receive(rt, tmp_path / "second", 1)).emitted
    (run,) = [r for r in flow_runs(PROCESS_DEPLOYMENT, since) if not r.auto_scheduled]
    assert run.state_name == "Scheduled"


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_a_run_a_killed_worker_left_pending_does_not_hold_events_back(
    flow_env: Settings, process_deployment: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed after claiming a run (Pending, its process not started yet) left it
    Pending: every event was held back for the next minute, a trickle of studies waited up to
    55 s. A run Pending past the grace counts as stuck."""
    from prefect.states import Pending

    monkeypatch.setattr(launcher, "PENDING_GRACE", timedelta(seconds=1))
    with Runtime.open(flow_env) as rt:
        since = utcnow()
        assert _stabilise(rt, _receive(rt, tmp_path / "first", 1)).emitted
        (run,) = wait_until(
            lambda: [r for r in flow_runs(PROCESS_DEPLOYMENT, since) if not r.auto_scheduled],
            30,
            "the event started no process run",
        )
        with get_client(sync_client=True) as client:  # claimed, as a worker does, then killed
            client.set_flow_run_state(run.id, Pending(name="Submitting"))
        assert not _stabilise(rt, _receive(rt, tmp_path / "second", 1)).emitted
        time.sleep(1.5)
        assert _stabilise(rt, _receive(rt, tmp_path / "third", 1)).emitted


@pytest.mark.postgres_s3
@pytest.mark.parametrize("settings", ["postgres-s3"], indirect=True)
def test_workers_on_two_machines_score_bursts_once_and_recover_from_a_kill(
    flow_env: Settings,
    prefect_api: PrefectServer,
    quick_task: str,
    tmp_path: Path,
    workers: list[Worker],
) -> None:
    """The production shape: PostgreSQL, S3, a Prefect server, two workers with separate data
    directories (two machines share nothing else).

    - studies stable before any worker ran are scored as soon as a worker listens;
    - a burst arriving over several receiver passes is scored by the listening worker, no run
      is cancelled, and every study is scored exactly once;
    - killing the worker whose listener scores delays scoring by seconds: the studies handed
      to it get their event once its lease runs out, and the other worker scores them
      (defect 3: a dead run held the deployment's only slot for 5 minutes).
    """
    with Runtime.open(flow_env) as rt:
        waiting = _labelled_studies(rt, quick_task, tmp_path / "first", 12)
        train_task(flow_env, rt.session_factory, rt.store, quick_task, progress=False)
        for n in (1, 2):
            env = worker_env(flow_env, prefect_api, data_dir=tmp_path / f"machine-{n}")
            workers.append(Worker(env, tmp_path / f"worker-{n}.log").start())
        for worker in workers:
            worker.wait_serving()
        _wait_scored(rt, waiting)

        since = utcnow()
        burst = []
        for p in range(3):  # three receiver passes, ten studies each
            burst.append(_receive(rt, tmp_path / f"burst-{p}", 10))
            _stabilise(rt, burst[-1])
        _wait_scored(rt, [uid for batch in burst for uid in batch])
        runs = flow_runs(PROCESS_DEPLOYMENT, since)
        assert not [r for r in runs if r.state_name == "Cancelled"]
        assert len([r for r in runs if r.state_name == "Completed"]) <= 3 + 2  # + schedule
        _assert_scored_once(rt)

        # One worker's listener scores in its own process (flows/listener.py). That machine
        # dies (SIGKILL of the worker and its flow runs). Studies handed to its listener
        # meanwhile get their event once its lease runs out (the receiver's Handoff); the other
        # worker's listener takes the lease over, and every study is scored once.
        listener = wait_until(lambda: listening_run(rt), SCORED_WITHIN, "no worker listens")
        (busy,) = [w for w in workers if listener.holder.endswith(f"/pid-{w.pid}")]
        busy.kill()
        handoff = Handoff()
        late = _receive(rt, tmp_path / "late", 5)
        _stabilise(rt, late, handoff)
        wait_until(
            lambda: handoff.listener is None or stabilise_and_process(rt, handoff=handoff).emitted,
            LISTENING_TTL.total_seconds() + 30,
            "the studies handed to the dead listener never got their event",
        )
        after = _receive(rt, tmp_path / "after", 5)
        _stabilise(rt, after, handoff)
        _wait_scored(rt, late + after)
        _assert_scored_once(rt)
        states = {r.id: r.state_name for r in flow_runs(PROCESS_DEPLOYMENT, since)}
        assert "Cancelled" not in states.values(), states


def _labelled_studies(rt: Runtime, task: str, folder: Path, n: int) -> list[str]:
    studies = write_cxr_studies(folder, n, seed=5, size=64)
    ingest.ingest_files(
        ingest.find_files(folder),
        settings=rt.settings,
        session_factory=rt.session_factory,
        store=rt.store,
    )
    with unit_of_work(rt.session_factory) as session:
        ingest.mark_stable(session, {s.study_uid for s in studies})
        for s in studies:
            value = "pneumonia" if s.positive else "normal"
            add_label(session, s.study_uid, task, value, source="test", author="tester")
    return [s.study_uid for s in studies]


def _receive(rt: Runtime, folder: Path, n: int) -> list[str]:
    """``n`` studies indexed as the receiver indexes them: RECEIVING until they are quiet."""
    studies = write_cxr_studies(folder, n, seed=hash(folder.name) % 1000, size=64)
    ingest.ingest_files(
        ingest.find_files(folder),
        settings=rt.settings,
        session_factory=rt.session_factory,
        store=rt.store,
    )
    return [s.study_uid for s in studies]


def _stabilise(rt: Runtime, uids: list[str], handoff: Handoff | None = None) -> StabiliseResult:
    """One receiver pass after the quiet period: these studies become stable."""
    result = stabilise_and_process(rt, now=utcnow() + timedelta(seconds=30), handoff=handoff)
    assert {p.study_uid for p in result.promoted} >= set(uids) and result.mode == "event"
    return result


def _wait_scored(rt: Runtime, uids: list[str]) -> None:
    def scored() -> bool:
        with rt.session_factory() as session:
            statuses = session.scalars(select(Study.status).where(Study.study_uid.in_(uids)))
            return all(status == StudyStatus.SCORED for status in statuses)

    wait_until(scored, SCORED_WITHIN, f"{len(uids)} studies not all scored in time")


def _assert_scored_once(rt: Runtime) -> None:
    with rt.session_factory() as session:
        per_study = session.execute(
            select(Prediction.study_id, func.count()).group_by(Prediction.study_id)
        ).all()
    assert per_study and all(count == 1 for _, count in per_study), per_study
