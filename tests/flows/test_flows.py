"""The spine end to end through Prefect: ingest -> label -> train -> process, on both backends."""

from __future__ import annotations

from pathlib import Path

import pytest
from live import server_events, wait_until
from servers import PrefectServer
from sqlalchemy import func, select

from demo.synthetic import write_cxr_studies
from flows.deliver import deliver_flow
from flows.deployments import scored_trigger
from flows.ingest import ingest_flow
from flows.launcher import SCORED_EVENT
from flows.process import process_and_deliver, process_flow
from flows.train import train_flow
from radflow.db import (
    Instance,
    ModelStatus,
    ModelVersion,
    Prediction,
    Study,
    StudyStatus,
    make_engine,
    make_sessionmaker,
    unit_of_work,
)
from radflow.db.base import utcnow
from radflow.learning.labels import add_label
from radflow.settings import Settings
from radflow.store import open_store


def _counts(settings: Settings) -> dict[str, int]:
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            return {
                m.__name__: int(session.scalar(select(func.count()).select_from(m)) or 0)
                for m in (Study, Instance, Prediction, ModelVersion)
            }
    finally:
        engine.dispose()


def test_spine_ingest_train_process(
    flow_env: Settings,
    quick_task: str,
    prefect_api: PrefectServer,
    tmp_path: Path,
) -> None:
    studies = write_cxr_studies(tmp_path / "incoming", 24, seed=3, size=128)

    ingested = ingest_flow(str(tmp_path / "incoming"))
    assert (ingested["stored"], ingested["stable_studies"]) == (24, 24)

    engine = make_engine(flow_env.database_url)
    factory = make_sessionmaker(engine)
    with unit_of_work(factory) as session:
        for s in studies[:16]:
            value = "pneumonia" if s.positive else "normal"
            add_label(session, s.study_uid, quick_task, value, source="test", author="tester")

    trained = train_flow(quick_task, progress=False)
    assert trained["model"] == f"{quick_task}:v1"
    assert trained["status"] == "champion"
    assert 0.0 <= trained["auc"] <= 1.0

    since = utcnow()
    processed = process_flow(quick_task)
    assert (processed["scored"], processed["failed"]) == (24, {})
    # With a server, the run's event starts the deliver deployment (here: called as it would be).
    (event,) = wait_until(
        lambda: server_events(prefect_api, SCORED_EVENT, since),
        30,
        "the process run's predictions event never reached the server",
    )
    assert scored_trigger().match.matches(event)
    # Every scored study gets its SR (the packaged rules send it nowhere).
    assert deliver_flow() == {
        "reports": 24,
        "reports_set_aside": {},
        "sent": 0,
        "retrying": 0,
        "parked": 0,
    }

    with factory() as session:
        version = session.scalars(select(ModelVersion)).one()
        assert version.status == ModelStatus.CHAMPION
        assert open_store(flow_env).exists(version.weights_key)
        statuses = set(session.scalars(select(Study.status)))
        assert statuses == {StudyStatus.SCORED}
        scores = session.scalars(select(Prediction.score)).all()
        assert all(0.0 <= s <= 1.0 for s in scores)
    engine.dispose()

    # Everything is idempotent: the same folder and the same scoring run again add nothing.
    before = _counts(flow_env)
    again = ingest_flow(str(tmp_path / "incoming"))
    assert (again["stored"], again["duplicates"]) == (0, 24)
    assert process_flow(quick_task)["scored"] == 0
    assert _counts(flow_env) == before


def test_embedded_default_delivers_after_processing(
    flow_env: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No server configured (as the flows see it; this session's server still runs them): the
    deliver flow runs right after the process flow, and no event is needed."""
    monkeypatch.setattr("flows.process.orchestrated", lambda: False)
    write_cxr_studies(tmp_path / "incoming", 2, seed=1, size=64)
    ingest_flow(str(tmp_path / "incoming"))
    processed = process_and_deliver(task_name=None)  # no champion: nothing to score
    assert processed["scored"] == 0 and processed["tasks"] == {}
    assert processed["results"] == {
        "reports": 0,
        "reports_set_aside": {},
        "sent": 0,
        "retrying": 0,
        "parked": 0,
    }


def test_process_without_a_champion_fails_with_a_way_out(
    flow_env: Settings, tmp_path: Path
) -> None:
    write_cxr_studies(tmp_path / "incoming", 2, seed=1, size=64)
    ingest_flow(str(tmp_path / "incoming"))
    state = process_flow("pneumonia-cxr", return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "no champion model yet" in message and "radflow train" in message
