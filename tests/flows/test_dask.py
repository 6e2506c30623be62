"""Scale-out: with RADFLOW_DASK_ADDRESS the process flow scores a backlog in shards on a Dask
cluster (Prefect's Dask task runner); every study is scored exactly once."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from demo.synthetic import write_cxr_studies
from flows.ingest import ingest_flow
from flows.process import process_flow
from radflow.db import Prediction, Study, StudyStatus, unit_of_work
from radflow.learning.labels import add_label
from radflow.learning.training import train_task
from radflow.runtime import Runtime
from radflow.settings import Settings


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[object]:
    from distributed import LocalCluster

    # The workers are spawned processes, which first run the parent's __main__ again, by its
    # file when it has no module name. After Streamlit's AppTest (tests/dashboard) that file
    # is dashboard/app.py: each worker started the dashboard and raced to create its database.
    # A bare __main__ gives them nothing to run.
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
        with LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster:
            yield cluster


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_a_backlog_is_scored_in_shards_on_two_dask_workers(
    flow_env: Settings,
    quick_task: str,
    tmp_path: Path,
    dask_cluster: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from distributed import Client, get_task_stream

    studies = write_cxr_studies(tmp_path / "in", 24, seed=8, size=64)
    ingest_flow(str(tmp_path / "in"))
    with Runtime.open(flow_env) as rt:
        with unit_of_work(rt.session_factory) as session:
            for s in studies[:12]:
                value = "pneumonia" if s.positive else "normal"
                add_label(session, s.study_uid, quick_task, value, source="test", author="t")
        train_task(flow_env, rt.session_factory, rt.store, quick_task, progress=False)
    address = dask_cluster.scheduler_address  # type: ignore[attr-defined]
    monkeypatch.setenv("RADFLOW_DASK_ADDRESS", address)
    monkeypatch.setenv("RADFLOW_DASK_SHARD_STUDIES", "6")

    with Client(address) as client, get_task_stream(client) as stream:
        result = process_flow(quick_task)

    assert result["scored"] == 24 and result["failed"] == {}
    shards = [t for t in stream.data if "score_shard" in t["key"] or "score-shard" in t["key"]]
    assert len({t["worker"] for t in shards}) == 2, "the shards did not use both Dask workers"
    with Runtime.open(flow_env) as rt, rt.session_factory() as session:
        counts = session.execute(
            select(Prediction.study_id, func.count()).group_by(Prediction.study_id)
        ).all()
        assert len(counts) == 24 and all(n == 1 for _, n in counts)
        assert set(session.scalars(select(Study.status))) == {StudyStatus.SCORED}
