"""`radflow worker` processes against the session's live Prefect server, and what the server says.

Shared by the live-server tests and benchmarks/pipeline.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from prefect.events import Event
from prefect.events.schemas.events import Resource
from servers import PrefectServer

WORKER_READY_SECONDS = 120.0


def settings_env(settings: Any) -> dict[str, str]:
    """``settings`` as the RADFLOW_* variables a worker (or any radflow process) reads."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        secret = getattr(value, "get_secret_value", None)
        env[f"RADFLOW_{name.upper()}"] = str(secret() if secret else value)
    return env


def worker_env(settings: Any, server: Any, *, data_dir: Path | None = None) -> dict[str, str]:
    """The environment of a radflow process on another machine: ``settings`` (with its own
    ``data_dir``: its own caches and logs), and the Prefect server's address."""
    env = {
        k: v for k, v in os.environ.items() if not k.upper().startswith(("RADFLOW_", "PREFECT_"))
    }
    if data_dir is not None:
        settings = settings.model_copy(update={"data_dir": data_dir})
    env.update(settings_env(settings))
    env.update(server.env())
    return env


class Worker:
    """``radflow worker --pool POOL`` in its own process group (a kill takes its flow runs too,
    as a lost machine would)."""

    def __init__(self, env: Mapping[str, str], log: Path, pool: str = "process") -> None:
        self.env, self.log, self.pool = dict(env), log, pool
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "worker", "--pool", self.pool],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        return self

    def wait_serving(self, timeout: float = WORKER_READY_SECONDS) -> None:
        """Until its deployments are registered and its runner starts asking for runs."""
        wait_until(
            lambda: "deployments registered, serving" in self.output(),
            timeout,
            f"worker never started serving; log:\n{self.output()[-3000:]}",
            alive=self,
        )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL the worker and every flow run it started: no clean-up of any kind."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()


def wait_until(
    condition: Callable[[], Any],
    timeout: float,
    message: str | Callable[[], str],
    *,
    alive: Worker | None = None,
    poll: float = 0.2,
) -> Any:
    """``condition()``'s first truthy value within ``timeout`` seconds, else AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if alive is not None and alive.process is not None and alive.process.poll() is not None:
            raise AssertionError(
                f"worker exited with {alive.process.returncode}:\n{alive.output()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(message() if callable(message) else message)
        time.sleep(poll)


def flow_runs(deployment: str | None = None, since: Any = None) -> list[Any]:
    """Flow runs on the server (of ``deployment``, "flow/deployment"), newest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        deployments = None
        if deployment is not None:
            found = client.read_deployment_by_name(deployment)
            deployments = DeploymentFilter(id=DeploymentFilterId(any_=[found.id]))
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                expected_start_time=FlowRunFilterExpectedStartTime(after_=since)
            )
            if since is not None
            else None,
            deployment_filter=deployments,
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=200,
        )
    return list(runs)


def server_events(server: PrefectServer, name: str, since: datetime) -> list[Resource]:
    """The resources of the events named ``name`` the server has recorded since ``since``."""
    query = {
        "filter": {"event": {"name": [name]}, "occurred": {"since": since.isoformat()}},
        "limit": 50,
    }
    response = httpx.post(f"{server.api_url}/events/filter", json=query, timeout=10)
    response.raise_for_status()
    return [Event.model_validate(e).resource for e in response.json()["events"]]
