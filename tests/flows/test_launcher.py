"""flows.launcher: the one place that decides where work starts, and starts it."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from factories import make_user
from sqlalchemy.orm import Session, sessionmaker

from flows import launcher
from radflow.db import unit_of_work
from radflow.services.users import PermissionDenied, Role


def test_flow_runs_without_a_prefect_server_say_so(
    session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launcher, "orchestrated", lambda: False)
    with unit_of_work(session_factory) as session:
        engineer = make_user(session, "max", Role.ML_ENGINEER)
        radiologist = make_user(session, "rita")
    with pytest.raises(launcher.FlowRunsUnavailable, match="PREFECT_API_URL"):
        launcher.recent_flow_runs(engineer)
    with pytest.raises(PermissionDenied):
        launcher.recent_flow_runs(radiologist)


def test_orchestrated_follows_prefects_own_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert launcher.orchestrated()
    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert not launcher.orchestrated()


def test_a_background_command_is_reaped_when_it_ends(tmp_path: Path) -> None:
    """A long-lived caller (the dashboard server) must not keep a zombie per process started."""
    started = launcher.start_background(["--help"], tmp_path / "logs" / "help.log")
    pid = int(started.ref)
    deadline = time.monotonic() + 60
    while _exists(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _exists(pid), "the finished process was left as a zombie"
    assert started.log is not None and "usage: radflow" in started.log.read_text()


def _exists(pid: int) -> bool:
    """Whether ``pid`` is still in the process table (a zombie counts: it was not reaped)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    return os.path.exists(f"/proc/{pid}")
