"""The fast path runs only where its guard allows; elsewhere the receiver runs on public API."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import tomllib
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from factories import dicom_bytes
from peers import radflow_env, storescu, tool

from radflow.ingest.receiver import Receiver, guard
from radflow.ingest.receiver.guard import WRITTEN_FOR
from radflow.settings import Settings

ROOT = Path(__file__).parents[3]
RECEIVE_ONCE = Path(__file__).with_name("receive_once.py")


def test_pins_are_the_releases_the_fast_path_was_written_for() -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    constraints = (ROOT / "constraints.txt").read_text().splitlines()
    for name, version in WRITTEN_FOR.items():
        assert f"{name}=={version}" in dependencies
        assert f"{name}=={version}" in constraints
    # So the tests' "fast" variants run the fast path, not the plain one again.
    assert guard.installed() == WRITTEN_FOR


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_the_path_under_test_is_the_one_running(
    receiver_path: str, start_receiver: Callable[..., Receiver], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="radflow.ingest.receiver"):
        start_receiver()
    assert f"({receiver_path} path)" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# Warnings each scenario must log (one line each, in this order), and nothing else above INFO.
SCENARIOS = {
    "another-pynetdicom": ["but pynetdicom 99.0.0 is installed"],
    "another-pydicom": ["but pydicom 99.0.0 is installed"],
    "private-names-missing": ["holds each dataset in memory", "fast path cannot load"],
    "fast-path-off": [],
}


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_status_and_receiving_without_the_fast_path(
    scenario: str, settings: Settings, tmp_path: Path
) -> None:
    """A fresh process (receive_once.py): pynetdicom's private modules renamed, or another
    pynetdicom or pydicom, or the operator's switch. ``radflow status --json`` works, the
    receiver stores and refuses instances on pynetdicom's public API, leaving no file behind,
    and says why in its warnings; no module of the fast path is even imported."""
    good, refused = tmp_path / "good.dcm", tmp_path / "no-pixels.dcm"
    good.write_bytes(dicom_bytes())
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes()))
    del ds.PixelData
    ds.save_as(refused, enforce_file_format=True)
    env = radflow_env(
        settings.model_copy(update={"receiver_fast_path": scenario != "fast-path-off"})
    )
    run = subprocess.run(
        [sys.executable, RECEIVE_ONCE, scenario, tool("/usr/bin/storescu"), good, refused],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    status_line, result_line = run.stdout.splitlines()[-2:]
    assert json.loads(status_line)["receiver"]["received"] == 0
    result = json.loads(result_line)
    assert result["counters"] == {
        "received": 2,
        "spooled": 1,
        "indexed": 1,
        "duplicates": 0,
        "index_retries": 0,
        "rejected": {"no-pixel-data": 1},
    }
    assert result["incoming_left"] == []
    assert result["fast_path_loaded"] == []
    warnings = [
        line
        for line in run.stderr.splitlines()
        if "WARNING" in line and "refused an instance" not in line  # the no-pixels file's
    ]
    assert len(warnings) == len(SCENARIOS[scenario]), run.stderr
    for line, expected in zip(warnings, SCENARIOS[scenario], strict=True):
        assert "radflow.ingest.receiver" in line and expected in line, line


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_a_large_dataset_is_streamed_to_disk_not_held_in_memory(
    start_receiver: Callable[..., Receiver], tmp_path: Path
) -> None:
    receiver = start_receiver()
    sent = tmp_path / "large.dcm"
    sent.write_bytes(dicom_bytes(np.zeros((4096, 4096), np.uint16)))  # 32 MiB of pixels
    tracemalloc.start()
    try:
        result = storescu(receiver.port, [sent])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.returncode == 0, result.stderr
    assert peak < 8 << 20  # a few PDUs at a time, never the dataset
    assert receiver.wait_indexed(30)
