"""`radflow demo` (what `make demo` runs, minus serving): every step, and idempotent."""

from __future__ import annotations

import json

import pytest

from cli.main import main
from radflow.settings import Settings


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_demo_scores_every_study_and_runs_again_without_duplicates(
    flow_env: Settings,
    quick_task: str,
    quick_volume_task: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    command = ["demo", "--studies", "30", "--ct-studies", "16", "--no-serve"]
    assert main(command) == 0
    first = capsys.readouterr().out
    assert "Trained pneumonia-cxr:v1" in first and "Trained adrenal-ct-3d:v1" in first
    # Every study scored by the task for it: the radiographs by the 2D task, the CT series
    # assembled into volumes and scored by the 3D task.
    assert "Scored 30 studies with pneumonia-cxr:v1" in first
    assert "Scored 16 studies with adrenal-ct-3d:v1" in first

    assert main(command) == 0
    second = capsys.readouterr().out
    assert second.count("already has a champion model") == 2
    assert "Scored 0 studies with pneumonia-cxr:v1" in second

    assert main(["status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status["studies"] == 30 + 16 and status["instances"] == 30 + 16 * 24
    assert status["studies_by_status"] == {"scored": 30 + 16}
    assert status["champions"] == {
        "pneumonia-cxr": "pneumonia-cxr:v1",
        "adrenal-ct-3d": "adrenal-ct-3d:v1",
    }
