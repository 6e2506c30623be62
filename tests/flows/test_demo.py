"""`radflow demo` (what `make demo` runs, minus serving): every step, and idempotent."""

from __future__ import annotations

import json

import pytest

from cli.main import main
from radflow.settings import Settings


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_demo_scores_every_study_and_runs_again_without_duplicates(
    flow_env: Settings, quick_task: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--studies", "30", "--no-serve"]) == 0
    first = capsys.readouterr().out
    assert "Trained pneumonia-cxr:v1" in first
    assert "Scored 30 studies" in first

    assert main(["demo", "--studies", "30", "--no-serve"]) == 0
    second = capsys.readouterr().out
    assert "already has a champion model" in second
    assert "Scored 0 studies" in second

    assert main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status["studies"] == 30 and status["instances"] == 30
    assert status["studies_by_status"] == {"scored": 30}
    assert status["champions"] == {"pneumonia-cxr": "pneumonia-cxr:v1"}
