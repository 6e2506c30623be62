"""The production shape on a live Prefect server (the session's ``prefect server start``).

Each test here covers a way production broke while no test ran against a real server:
schedules that never ran, listings answering 422, a killed worker blocking scoring, stable
studies waiting for an event that was lost (or for a champion that came later), and a burst of
studies flooding the server with cancelled runs.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from factories import make_user
from live import Worker, flow_runs, wait_until, worker_env
from prefect import flow
from servers import PrefectServer
from sqlalchemy import func, select

from demo.synthetic import write_cxr_studies
from flows.deployments import deployments, retrain_deployment
from flows.launcher import PROCESS_DEPLOYMENT, labels_recorded, recent_flow_runs
from flows.train import train_flow
from flows.trigger import stabilise_and_process
from radflow import ingest
from radflow.db import Prediction, Study, StudyStatus, unit_of_work
from radflow.db.base import utcnow
from radflow.learning.labels import add_label
from radflow.learning.training import train_task
from radflow.runtime import Runtime
from radflow.services.users import Role
from radflow.settings import Settings

SCORED_WITHIN = 90.0  # generous: a flow run spawns a fresh Python that imports PyTorch


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
    runs = wait_until(
        lambda: [r for r in flow_runs("train/retrain", since) if r.parameters.get("if_due")],
        60,
        "3 label events did not start the retrain deployment",
    )
    assert runs[0].parameters["task_name"] == quick_task


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_a_new_champion_starts_scoring_of_the_studies_that_waited(
    flow_env: Settings, prefect_api: PrefectServer, quick_task: str, tmp_path: Path
) -> None:
    """Defect 4: studies stable before the first champion were never picked up after it."""
    for deployment in deployments("process", flow_env):
        deployment.apply()
    with Runtime.open(flow_env) as rt:
        _labelled_studies(rt, quick_task, tmp_path / "in", 12)
    since = utcnow()
    assert train_flow(quick_task, progress=False)["status"] == "champion"
    # Not the interval schedule's runs: one started for the studies that waited.
    started = [r for r in flow_runs(PROCESS_DEPLOYMENT, since) if not r.auto_scheduled]
    assert started, "training a champion started no process run for the waiting studies"


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()


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

    - studies stable before any worker ran are scored by a worker's start-up reconcile;
    - a burst arriving over several receiver passes starts one run per pass, none cancelled,
      and every study is scored exactly once;
    - killing every worker mid-run (and starting a new one) delays scoring by seconds
      (defect 3: the dead run held the deployment's only slot for 5 minutes).
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

        # Every worker dies while a run scores (a power cut); a new worker starts.
        late = _receive(rt, tmp_path / "late", 5)
        since = utcnow()
        _stabilise(rt, late)
        wait_until(
            lambda: [r for r in flow_runs(PROCESS_DEPLOYMENT, since) if r.state_name == "Running"],
            SCORED_WITHIN,
            "no process run started for the late studies",
        )
        for worker in workers:
            worker.kill()
        env = worker_env(flow_env, prefect_api, data_dir=tmp_path / "machine-3")
        workers.append(Worker(env, tmp_path / "worker-3.log").start())
        workers[-1].wait_serving()
        after = _receive(rt, tmp_path / "after", 5)
        _stabilise(rt, after)
        _wait_scored(rt, late + after)
        _assert_scored_once(rt)
        cancelled = [r for r in flow_runs(PROCESS_DEPLOYMENT, since) if r.state_name == "Cancelled"]
        assert cancelled == []


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


def _stabilise(rt: Runtime, uids: list[str]) -> None:
    """One receiver pass after the quiet period: these studies become stable, one event."""
    result = stabilise_and_process(rt, now=utcnow() + timedelta(seconds=30))
    assert {p.study_uid for p in result.promoted} >= set(uids) and result.mode == "event"


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
