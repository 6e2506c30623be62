"""Flows read their settings from the environment, as deployed flows do; and need a Prefect API:
the session's live server (tests/conftest.py ``prefect_server``), which the live-server tests
also drive with workers."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from live import settings_env
from prefect.settings import PREFECT_API_URL, temporary_settings
from servers import PrefectServer

from radflow.learning import tasks
from radflow.learning.tasks import TrainingPlan
from radflow.settings import Settings


@pytest.fixture(scope="session")
def prefect_api(prefect_server: PrefectServer) -> Iterator[PrefectServer]:
    """The live server as this process's Prefect API for the session (flows run against it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFECT_API_URL", prefect_server.api_url)
        with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
            yield prefect_server


@pytest.fixture
def flow_env(
    settings: Settings, prefect_api: PrefectServer, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """``settings`` exported as RADFLOW_* variables, the way a worker receives them."""
    for name, value in settings_env(settings).items():
        monkeypatch.setenv(name, value)
    assert Settings().database_url == settings.database_url
    return settings


@pytest.fixture
def quick_task(monkeypatch: pytest.MonkeyPatch) -> str:
    """pneumonia-cxr with a two-epoch plan, so flow tests exercise training without waiting."""
    task = tasks.get_task("pneumonia-cxr")
    quick = dataclasses.replace(task, plan=TrainingPlan(epochs=2, batch_size=8, min_labels=8))
    monkeypatch.setitem(tasks.TASKS, task.name, quick)
    return task.name


@pytest.fixture
def quick_volume_task(monkeypatch: pytest.MonkeyPatch) -> str:
    """adrenal-ct-3d with a two-epoch plan that trains on 8 labels."""
    task = tasks.get_task("adrenal-ct-3d")
    quick = dataclasses.replace(task, plan=TrainingPlan(epochs=2, batch_size=8, min_labels=8))
    monkeypatch.setitem(tasks.TASKS, task.name, quick)
    return task.name
