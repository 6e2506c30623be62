"""Retraining on new labels: due checks from the database, the embedded trigger, one at a time."""

from __future__ import annotations

import dataclasses
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from demo.synthetic import SyntheticStudy, write_cxr_studies
from flows import launcher
from flows.deployments import retrain_triggers
from flows.ingest import ingest_flow
from flows.launcher import LABEL_EVENT, labels_recorded
from flows.train import train_flow
from radflow import leases
from radflow.db import (
    AuditEvent,
    ModelEvaluation,
    ModelStatus,
    ModelVersion,
    TrainingRun,
    make_engine,
    make_sessionmaker,
    unit_of_work,
)
from radflow.learning import tasks
from radflow.learning.labels import add_label
from radflow.learning.retrain import TrainingInProgress, lease_name, retrain_status
from radflow.learning.training import train_task
from radflow.settings import Settings
from radflow.store import open_store


def _label(settings: Settings, task: str, studies: list[SyntheticStudy]) -> None:
    engine = make_engine(settings.database_url)
    with unit_of_work(make_sessionmaker(engine)) as session:
        for s in studies:
            value = "pneumonia" if s.positive else "normal"
            add_label(session, s.study_uid, task, value, source="review", author="dr-test")
    engine.dispose()


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_enough_new_labels_retrain_by_themselves_and_the_registry_says_why(
    flow_env: Settings, quick_task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The embedded default: no Prefect server (the flow tests' harness sets one process-wide).
    monkeypatch.setattr(launcher, "orchestrated", lambda: False)
    monkeypatch.setenv("RADFLOW_RETRAIN_AFTER_LABELS", "4")
    # A larger held-out share than the quick plan's, so the evaluation set supports the test.
    task = tasks.get_task(quick_task)
    plan = dataclasses.replace(task.plan, val_fraction=0.4)
    monkeypatch.setitem(tasks.TASKS, quick_task, dataclasses.replace(task, plan=plan))
    studies = write_cxr_studies(tmp_path / "in", 28, seed=4, size=64)
    ingest_flow(str(tmp_path / "in"))
    _label(flow_env, quick_task, studies[:20])
    assert train_flow(quick_task, progress=False)["status"] == "champion"

    # Three new labels: not due; the trigger does nothing.
    _label(flow_env, quick_task, studies[20:23])
    assert labels_recorded(quick_task, 3) is None
    # The fourth: due, and the embedded path trains at once.
    _label(flow_env, quick_task, studies[23:24])
    result = labels_recorded(quick_task, 1)

    assert isinstance(result, dict) and result["model"] == f"{quick_task}:v2"
    engine = make_engine(flow_env.database_url)
    with make_sessionmaker(engine)() as session:
        v1, v2 = session.scalars(select(ModelVersion).order_by(ModelVersion.version)).all()
        evaluation = session.scalars(
            select(ModelEvaluation).where(ModelEvaluation.model_version_id == v2.id)
        ).one()
        assert evaluation.champion_version_id == v1.id
        assert evaluation.promoted == (v2.status == ModelStatus.CHAMPION)
        assert "DeLong p" in evaluation.reason and v2.metrics["decision"] == evaluation.reason
        assert v2.parent_id == v1.id
        runs = session.scalars(select(TrainingRun).order_by(TrainingRun.id)).all()
        # The retrain learnt from 20 + 4 labels and decoded only the 4 new images.
        assert len(runs[1].label_ids) == 24
        assert runs[1].history["data_loading"]["cache_misses"] == 4
        assert len(runs[1].history["epochs"]) == 2
    engine.dispose()

    # Nothing new since: the scheduled check does not train again.
    assert train_flow(quick_task, progress=False, if_due=True)["trained"] is False


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_a_running_training_blocks_another_until_its_lease_expires(
    flow_env: Settings, quick_task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live training blocks the next; a crashed one (no renewal) only until its lease
    expires, not for hours, and it ends marked abandoned."""
    studies = write_cxr_studies(tmp_path / "in", 12, seed=2, size=64)
    ingest_flow(str(tmp_path / "in"))
    _label(flow_env, quick_task, studies)
    engine = make_engine(flow_env.database_url)
    factory = make_sessionmaker(engine)
    store = open_store(flow_env)
    # A training elsewhere: its lease taken (and kept renewed), its run marked running.
    ttl = timedelta(seconds=1)
    assert leases.try_acquire(factory, lease_name(quick_task), "worker-2/flow-run", ttl).ok
    with unit_of_work(factory) as session:
        session.add(TrainingRun(task=quick_task, status="running"))
    with pytest.raises(TrainingInProgress, match="in progress, held by worker-2/flow-run"):
        train_task(flow_env, factory, store, quick_task, progress=False)
    # Its process dies: nothing renews the lease, which expires within its time to live.
    time.sleep(ttl.total_seconds())
    version = train_task(flow_env, factory, store, quick_task, progress=False)
    assert version.version == 1
    with factory() as session:
        dead, done = session.scalars(select(TrainingRun).order_by(TrainingRun.id)).all()
        assert dead.status == "abandoned" and "worker-2/flow-run" in (dead.error or "")
        assert done.status == "completed"
        assert leases.read(session, lease_name(quick_task)) is None  # released at the end
    engine.dispose()


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_an_operator_abandons_a_stuck_training_from_the_command_line(
    flow_env: Settings, quick_task: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.main import main

    engine = make_engine(flow_env.database_url)
    factory = make_sessionmaker(engine)
    assert leases.try_acquire(factory, lease_name(quick_task), "gpu-1/pid-7", timedelta(hours=1)).ok
    with unit_of_work(factory) as session:
        run = TrainingRun(task=quick_task, status="running")
        session.add(run)
        session.flush()
        run_id = run.id
    assert main(["training", "list", "--task", quick_task]) == 0
    listed = capsys.readouterr().out
    assert f"{run_id}" in listed and "running" in listed and "gpu-1/pid-7" in listed
    assert main(["training", "abandon", str(run_id), "--reason", "GPU host lost"]) == 0
    with factory() as session:
        assert retrain_status(session, quick_task, 50).running_run_id is None
        stuck = session.get_one(TrainingRun, run_id)
        assert stuck.status == "abandoned" and "GPU host lost" in (stuck.error or "")
        (event,) = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "abandon-training")
        ).all()
        assert event.object_id == str(run_id) and event.details["holder"] == "gpu-1/pid-7"
    assert main(["training", "abandon", str(run_id)]) == 2  # not running any more: said so
    engine.dispose()


def test_deployment_triggers_count_label_events_per_task() -> None:
    (trigger,) = retrain_triggers(50, ["pneumonia-cxr"])
    assert trigger.expect == {LABEL_EVENT} and trigger.threshold == 50
    assert trigger.parameters == {"task_name": "pneumonia-cxr", "if_due": True, "progress": False}
