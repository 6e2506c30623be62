"""The spine end to end through Prefect: ingest -> label -> train -> process, on both backends."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from demo.synthetic import write_cxr_studies
from flows.ingest import ingest_flow
from flows.process import process_flow
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


def test_spine_ingest_train_process(flow_env: Settings, quick_task: str, tmp_path: Path) -> None:
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

    processed = process_flow(quick_task)
    assert (processed["scored"], processed["failed"]) == (24, {})
    # Every scored study gets its SR (the packaged rules send it nowhere).
    assert processed["results"]["reports"] == 24

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


def test_process_without_a_champion_fails_with_a_way_out(
    flow_env: Settings, tmp_path: Path
) -> None:
    write_cxr_studies(tmp_path / "incoming", 2, seed=1, size=64)
    ingest_flow(str(tmp_path / "incoming"))
    state = process_flow("pneumonia-cxr", return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "no champion model yet" in message and "radflow train" in message
