"""Starting work: the one place that knows whether an orchestration server runs and how work starts.

- :func:`orchestrated`: whether a Prefect server is configured (``PREFECT_API_URL``, read the
  way Prefect reads it). Nothing else in Radflow asks.
- With a server, work starts there: events (:func:`emit`) drive the deployments' triggers
  (flows/deployments.py) and :func:`start_training` schedules a deployment run for a worker.
- On the embedded default (no server), flows run in the calling process, or a ``radflow``
  command runs in the background (:func:`start_background`), reaped when it ends.

The database is the source of truth for what needs doing; events only make it fast.
:func:`reconcile` starts whatever the database says is left (stable studies not scored by their
task's champion, tasks due for retraining): at worker start, after a training registers a
champion, and (through the deployments' schedules) every minute and every hour.

Work that must run once at a time holds a lease (radflow.leases) named by :func:`holder`: a flow
run's holder is its flow run id, so whoever takes over an expired lease marks the dead run
Crashed on the server (:func:`crash_dead_run`) instead of leaving it Running for hours.

The dashboard imports this module and nothing else of ``flows``; the CLI and the flows use it
too. The train flow itself decides from the database whether a task is due, so a trigger that
fires twice, or late, trains at most once.
"""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from uuid import UUID, uuid4

from radflow.db import unit_of_work
from radflow.db.registry import champion_tasks
from radflow.errors import RadflowError
from radflow.learning.retrain import retrain_status
from radflow.learning.tasks import TASKS
from radflow.leases import LeaseState, this_process
from radflow.leases import read as read_lease
from radflow.runtime import Runtime
from radflow.services.users import Permission, Principal, require
from radflow.settings import Settings

logger = logging.getLogger(__name__)

STABLE_EVENT = "radflow.study.stable"
STABLE_RESOURCE = "radflow.stable-studies"
"""One event per pass that found studies stable (not one per study): a burst of studies starts
one run, which scores them all."""
LABEL_EVENT = "radflow.label.created"
SCORED_EVENT = "radflow.predictions.recorded"
"""A process flow run recorded new predictions: their results are due (the deliver deployment)."""
TRAIN_DEPLOYMENT = "train/train"
"""flow name / deployment name, as flows/deployments.py serves it."""
PROCESS_DEPLOYMENT = "process/process"
FLOW_RUN_HOLDER = "flow-run/"
WAITING_WINDOW = timedelta(seconds=60)
"""How long an event-started run may wait for a worker before an event goes out again."""
CLOCK_SKEW = timedelta(seconds=5)
PENDING_GRACE = timedelta(seconds=20)
"""How long a run may stay Pending (a worker starting its process: seconds) before it counts as
stuck: the worker that claimed it died before the run began, and nothing will start it."""
LISTENING_LEASE = "process:listening"
"""Held by the one process run that lingers after scoring (flows/process.py): while it is live,
the receiver hands it newly stable studies without an event (flows/trigger.py)."""
LISTENING_TTL = timedelta(seconds=6)
"""The listening run renews its lease every third of this; a dead one is noticed within it."""
LISTENING_MARGIN = timedelta(seconds=1)
"""A listener whose lease runs out sooner than this is taken for dead: the event goes out."""


class NoPrefectServer(RadflowError):
    """A command that needs the Prefect server found none; the message says what to do."""


def api_url() -> str | None:
    """PREFECT_API_URL as Prefect reads it, without importing Prefect when it is not loaded.

    Prefect's own settings (a temporary override, the environment, the active profile) once it
    is imported; before that the environment, which Prefect would read first anyway, and only
    without it the profile (importing Prefect costs a light command like `radflow label` two
    seconds).
    """
    if "prefect.settings" not in sys.modules and "PREFECT_API_URL" in os.environ:
        return os.environ["PREFECT_API_URL"] or None
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def orchestrated() -> bool:
    """Whether a Prefect server is configured: work then starts there, not in this process."""
    return api_url() is not None


def require_server(timeout: float = 5.0) -> str:
    """The configured Prefect API URL, once it answers; NoPrefectServer otherwise.

    Without PREFECT_API_URL Prefect would quietly start a temporary server of its own, which
    no receiver, dashboard or automation can reach: a worker serving it would never run a thing.
    """
    import httpx

    url = api_url()
    if not url:
        raise NoPrefectServer(
            "no Prefect server configured: set PREFECT_API_URL (e.g. "
            "http://127.0.0.1:4200/api, after `prefect server start`) in the environment of "
            "the worker, the receiver and the dashboard alike. Without a server, flows run in "
            "the calling process (`radflow receive`, `radflow watch`, `radflow process`) and "
            "need no worker"
        )
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=timeout).raise_for_status()
    except httpx.HTTPError as exc:
        raise NoPrefectServer(
            f"the Prefect server at PREFECT_API_URL={url} does not answer ({exc}): start it "
            "(`prefect server start`) or correct PREFECT_API_URL"
        ) from exc
    return url


def holder() -> str:
    """Who holds a lease taken here: the flow run (so a taker can mark it Crashed), or this
    process outside a flow run."""
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    return f"{FLOW_RUN_HOLDER}{run_id}" if run_id else this_process()


def crash_dead_run(dead: LeaseState) -> None:
    """Mark the flow run behind an expired lease Crashed, if the server still shows it running.

    Its process stopped renewing the lease, so it died (a killed worker, a lost machine); the
    server would otherwise show it Running until its heartbeats are missed for minutes.
    """
    if not dead.holder.startswith(FLOW_RUN_HOLDER) or not orchestrated():
        return
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    run_id = dead.holder.removeprefix(FLOW_RUN_HOLDER)
    message = f"its lease {dead.name} expired at {dead.expires_at:%H:%M:%S} UTC: its process died"
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(UUID(run_id))
            if run.state is None or run.state.is_final():
                return
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
    except (httpx.HTTPError, ObjectNotFound, ValueError) as exc:
        logger.warning("could not mark flow run %s crashed: %s", run_id, exc)
        return
    logger.warning("flow run %s marked Crashed: %s", run_id, message)


def listening_run(rt: Runtime) -> LeaseState | None:
    """The process run lingering for newly stable studies, if one is live (and stays live for
    at least :data:`LISTENING_MARGIN`), else None."""
    with rt.session_factory() as session:
        lease = read_lease(session, LISTENING_LEASE)
    if lease is None or not lease.live(datetime.now(UTC) + LISTENING_MARGIN):
        return None
    return lease


def emit(event: str, resource: dict[str, str], count: int = 1) -> None:
    """``count`` copies of one event for the server's automations, in one request.

    Posted and confirmed by the server (not queued in memory for a background sender): when the
    server is down the caller hears of it (an outage) and the work stays recorded in the
    database for the reconciler, instead of an event silently lost.
    """
    import httpx

    url = api_url()
    if url is None:
        raise NoPrefectServer("no Prefect server configured (PREFECT_API_URL) to emit events to")
    occurred = datetime.now(UTC).isoformat()
    body = [
        {"id": str(uuid4()), "occurred": occurred, "event": event, "resource": resource}
        for _ in range(count)
    ]
    response = httpx.post(f"{url.rstrip('/')}/events", json=body, headers=_auth(), timeout=10)
    response.raise_for_status()


def event_run_waiting(deployment: str = PROCESS_DEPLOYMENT) -> bool:
    """Whether a run of ``deployment`` that an event started is waiting to start: Scheduled and
    due within the last ``WAITING_WINDOW``, or Pending for less than ``PENDING_GRACE``.

    Such a run reads the database when it starts, so it also takes whatever became due since:
    another event would only start another process. Runs older than the window count as
    stuck (no worker took them), so an event goes out again, at most one a window; so do runs
    Pending longer than the grace, which a killed worker claimed and never started (they held
    back every event for a minute after a worker was killed: a trickle of studies waited up to
    55 s).
    """
    import httpx

    url = api_url()
    if url is None:
        raise NoPrefectServer("no Prefect server configured (PREFECT_API_URL) to ask")
    flow_name, deployment_name = deployment.split("/")
    now = datetime.now(UTC)
    body = {
        "flows": {"name": {"any_": [flow_name]}},
        "deployments": {"name": {"any_": [deployment_name]}},
        "flow_runs": {
            "state": {"type": {"any_": ["SCHEDULED", "PENDING"]}},
            "created_by": {"type_": ["AUTOMATION"]},
            "expected_start_time": {
                "after_": (now - WAITING_WINDOW).isoformat(),
                "before_": (now + CLOCK_SKEW).isoformat(),
            },
        },
        "limit": 20,
    }
    response = httpx.post(f"{url.rstrip('/')}/flow_runs/filter", json=body, headers=_auth())
    response.raise_for_status()
    return any(_will_start(run["state"], now) for run in response.json())


def _will_start(state: dict[str, Any], now: datetime) -> bool:
    """Whether a Scheduled or Pending run (its ``state`` as the API gives it) still starts."""
    if state["type"] != "PENDING":
        return True
    since = datetime.fromisoformat(state["timestamp"])
    return now - since < PENDING_GRACE


def _auth() -> dict[str, str]:
    # What Prefect's client sends: an API key (Prefect Cloud) or a basic-auth string (a
    # self-hosted server with PREFECT_SERVER_API_AUTH_STRING).
    if key := os.environ.get("PREFECT_API_KEY"):
        return {"Authorization": f"Bearer {key}"}
    if auth := os.environ.get("PREFECT_API_AUTH_STRING"):
        return {"Authorization": f"Basic {base64.b64encode(auth.encode()).decode()}"}
    return {}


def task_resource(task_name: str) -> dict[str, str]:
    # The task, not the study: events are kept by Prefect, outside the clinical store.
    return {"prefect.resource.id": f"radflow.task.{task_name}", "radflow.task": task_name}


@dataclass(frozen=True)
class Started:
    """Work started elsewhere: a deployment run on a worker, or a process on this machine."""

    how: Literal["deployment", "process"]
    ref: str
    """The flow run id, or the process id."""
    log: Path | None = None
    """The process's log file (a local process only)."""


def start_background(arguments: Sequence[str], log: Path) -> Started:
    """``radflow ARGUMENTS`` as a detached process logging to ``log``; reaped when it ends.

    It reads the caller's RADFLOW_* environment and outlives the caller (a dashboard restart,
    a closed tab), like a deployment run would.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", *arguments],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    # Collect its exit status when it ends, so a long-lived caller (the dashboard server) does
    # not keep a zombie per process started.
    name = f"reap-{arguments[0] if arguments else 'radflow'}-{process.pid}"
    threading.Thread(target=process.wait, name=name, daemon=True).start()
    command = " ".join(arguments)
    logger.info("started `radflow %s` as process %d (log %s)", command, process.pid, log)
    return Started("process", str(process.pid), log)


def start_processing(settings: Settings) -> Started | None:
    """Start the process flow for every task with a champion: a deployment run when a server
    is configured, else a background ``radflow process`` here.

    None when the server has no process deployment yet: no worker ever started, and the first
    one's start-up reconcile scores what waits.
    """
    if orchestrated():
        from prefect.deployments import run_deployment
        from prefect.exceptions import ObjectNotFound

        try:
            run = run_deployment(PROCESS_DEPLOYMENT, timeout=0)
        except ObjectNotFound:
            logger.warning(
                "no %s deployment on the Prefect server yet: the stable studies are scored "
                "when a `radflow worker` starts",
                PROCESS_DEPLOYMENT,
            )
            return None
        return Started("deployment", str(run.id))
    return start_background(["process"], settings.data_dir / "logs" / "process.log")


@dataclass(frozen=True)
class Reconciled:
    """What the database said was left to do, and what was started for it."""

    scoring: list[str]
    """Tasks with stable studies their champion has not scored."""
    training: list[str]
    """Tasks due for retraining."""
    started: list[Started]


def reconcile(rt: Runtime, *, scoring: bool = True, training: bool = True) -> Reconciled:
    """Start processing if any stable study waits for its champion, and the training of every
    task due for it: whatever events were lost (a receiver restarted while the server was down,
    studies that arrived before the first champion), the database still says what is left."""
    from radflow.learning.scoring import has_pending

    with rt.session_factory() as session:
        pending = [t for t in champion_tasks(session) if has_pending(session, t)] if scoring else []
        threshold = rt.settings.retrain_after_labels
        due = (
            [t for t in sorted(TASKS) if retrain_status(session, t, threshold).due]
            if training
            else []
        )
    processing = start_processing(rt.settings) if pending else None
    started = [processing] if processing is not None else []
    started += [start_training(rt.settings, task, if_due=True) for task in due]
    if pending or due:
        logger.info("reconciled: scoring pending for %s, due for training %s", pending, due)
    return Reconciled(pending, due, started)


def start_training(settings: Settings, task_name: str, *, if_due: bool = False) -> Started:
    """Start the train flow for ``task_name``: a deployment run when a server is configured,
    else a background ``radflow train`` (``retrain --if-due`` with ``if_due``) here."""
    if orchestrated():
        from prefect.deployments import run_deployment

        parameters: dict[str, Any] = {"task_name": task_name, "progress": False, "if_due": if_due}
        # timeout=0: return as soon as the run is scheduled; a worker picks it up.
        run = run_deployment(TRAIN_DEPLOYMENT, parameters=parameters, timeout=0)
        return Started("deployment", str(run.id))
    command = ["retrain", "--if-due"] if if_due else ["train"]
    log = settings.data_dir / "logs" / f"{command[0]}-{task_name}.log"
    return start_background([*command, "--task", task_name, "--no-progress"], log)


def labels_recorded(
    task_name: str, count: int = 1, *, wait: bool = True, rt: Runtime | None = None
) -> dict[str, Any] | Started | None:
    """Announce ``count`` new labels; on the embedded default, retrain ``task_name`` if due.

    With a server: one ``radflow.label.created`` event per label (the retrain deployment's
    trigger counts them) and None. Without: the due check runs here (cheaply: most labels do
    not make a task due); a due training runs in this process with ``wait`` (the CLI: the
    train flow's result is returned) or in the background without (the dashboard: Started).
    ``rt``: the caller's open runtime, if any (else one is opened from the environment).
    """
    if orchestrated():
        emit(LABEL_EVENT, task_resource(task_name), count)
        return None
    runtime = rt or Runtime.open(Settings())
    try:
        with unit_of_work(runtime.session_factory) as session:
            due = retrain_status(session, task_name, runtime.settings.retrain_after_labels).due
        settings = runtime.settings
    finally:
        if rt is None:
            runtime.close()
    if not due:
        return None
    if not wait:
        return start_training(settings, task_name, if_due=True)
    from flows.embedded import run_settings
    from flows.train import train_flow

    with run_settings():
        result: dict[str, Any] = train_flow(task_name, progress=False, if_due=True)
    return result if result.get("trained") else None


@dataclass(frozen=True)
class FlowRunRow:
    flow: str
    name: str
    state: str
    start_time: datetime | None
    end_time: datetime | None
    message: str | None


class FlowRunsUnavailable(Exception):
    """The Prefect API could not be asked; the message says why."""


def recent_flow_runs(principal: Principal, *, limit: int = 30) -> list[FlowRunRow]:
    """The newest flow runs on the Prefect server (the pipeline page).

    Raises FlowRunsUnavailable when no server is configured (flows then run in-process with a
    temporary server that keeps no history) or it does not answer.
    """
    require(principal, Permission.VIEW_PIPELINE)
    if not orchestrated():
        raise FlowRunsUnavailable(
            "no Prefect server configured (PREFECT_API_URL is unset): flows run in-process "
            "and keep no run history; start `prefect server start` and `radflow worker` to see runs"
        )
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    # Not the schedules' future runs (the scheduler keeps many ahead): they would fill the page.
    happened = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=[StateType.SCHEDULED]))
    )
    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_run_filter=happened, sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=limit
            )
            flows = {f.id: f.name for f in client.read_flows(limit=200)}
    except (httpx.HTTPError, OSError, RuntimeError) as exc:
        raise FlowRunsUnavailable(
            f"the Prefect server at {api_url()} did not answer: {exc}"
        ) from exc
    return [
        FlowRunRow(
            flow=flows.get(run.flow_id, str(run.flow_id)),
            name=run.name,
            state=run.state_name or "unknown",
            start_time=run.start_time,
            end_time=run.end_time,
            message=run.state.message if run.state is not None else None,
        )
        for run in runs
    ]
