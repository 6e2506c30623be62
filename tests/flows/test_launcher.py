"""flows.launcher: the one place that decides where work starts, and starts it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from factories import make_study, make_user
from live import wait_until, worker_env
from servers import PrefectServer
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from flows import launcher
from radflow.db import Label, unit_of_work
from radflow.db.base import utcnow
from radflow.runtime import Runtime
from radflow.services.users import PermissionDenied, Role
from radflow.settings import Settings


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


def test_a_worker_refuses_to_start_without_a_reachable_prefect_server(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without PREFECT_API_URL Prefect quietly served a temporary server no one could reach."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cli.main import main

    # A key of its own: without one the worker is refused before it looks for a server.
    monkeypatch.setenv("RADFLOW_PSEUDONYM_KEY", "a-test-key-that-is-not-the-public-one")

    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert main(["worker"]) == 2
    assert "no Prefect server configured: set PREFECT_API_URL" in capsys.readouterr().err
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert main(["worker", "--pool", "train"]) == 2
    err = capsys.readouterr().err
    assert "http://127.0.0.1:9/api does not answer" in err and "prefect server start" in err


LABEL_SCRIPT = """
import sys
from cli.main import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("prefect", "torch", "monai") if m in sys.modules)
print("loaded:", ",".join(heavy) or "-")
raise SystemExit(code)
"""


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_labelling_loads_neither_prefect_nor_pytorch_and_reaches_the_server(
    flow_env: Settings, prefect_api: PrefectServer, tmp_path: Path
) -> None:
    """`radflow label` took ~6 s a call: it imported MONAI and Prefect (seconds each) to check
    a value and send an event. Now it loads neither, and the events reach the server."""
    import httpx

    with Runtime.open(flow_env) as rt, unit_of_work(rt.session_factory) as session:
        uids = [make_study(session, rt.store).study_uid for _ in range(3)]
    csv = tmp_path / "labels.csv"
    csv.write_text("study_uid,value\n" + "".join(f"{u},normal\n" for u in uids[1:]))
    env = worker_env(flow_env, prefect_api)
    since = utcnow()
    for args in (["label", uids[0], "pneumonia"], ["label", "--csv", str(csv)]):
        run = subprocess.run(
            [sys.executable, "-c", LABEL_SCRIPT, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        assert "loaded: -" in run.stdout
    query = {
        "filter": {
            "event": {"name": [launcher.LABEL_EVENT]},
            "occurred": {"since": since.isoformat()},
        }
    }

    def stored() -> int:  # the server stores events a moment after it accepts them
        url = f"{prefect_api.api_url}/events/filter"
        return len(httpx.post(url, json=query, timeout=10).json()["events"])

    wait_until(lambda: stored() == 3, 30, lambda: f"{stored()} label events stored, not 3")
    with Runtime.open(flow_env) as rt, rt.session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Label)) == 3
