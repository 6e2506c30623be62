"""What starts a retraining when labels arrive: the one place that decides.

- A Prefect server runs (``PREFECT_API_URL`` set): one ``radflow.label.created`` event per
  label; the ``retrain`` deployment's trigger (threshold: ``retrain_after_labels`` events) starts
  the train flow with ``if_due``, and an hourly schedule on the same deployment catches up on
  anything the events missed (a server restart, labels written while no server ran).
- The embedded default (no server): after labels are recorded, the due check runs here and,
  when due, the train flow is called directly (the CLI waits for it), or started as a
  background ``radflow retrain --if-due`` process (the dashboard: a training takes minutes, and
  the radiologist's page must not wait for it).

Either way the train flow itself decides from the database whether the task is due, so a
trigger that fires twice, or late, trains at most once.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger, emit_event
from prefect.schedules import Interval

from flows.trigger import TriggerMode, trigger_mode
from radflow.db import unit_of_work
from radflow.learning.retrain import retrain_status
from radflow.learning.tasks import TASKS
from radflow.runtime import Runtime
from radflow.settings import Settings

logger = logging.getLogger(__name__)

LABEL_EVENT = "radflow.label.created"


def task_resource(task_name: str) -> dict[str, str]:
    # The task, not the study: events are kept by Prefect, outside the clinical store.
    return {"prefect.resource.id": f"radflow.task.{task_name}", "radflow.task": task_name}


@dataclass(frozen=True)
class BackgroundRetrain:
    """A training started in a background process on this machine."""

    task: str
    pid: int
    log: Path


def labels_recorded(
    task_name: str,
    count: int = 1,
    *,
    mode: TriggerMode | None = None,
    wait: bool = True,
    rt: Runtime | None = None,
) -> dict[str, Any] | BackgroundRetrain | None:
    """Announce ``count`` new labels; on the embedded default, retrain if due.

    With ``wait`` (the CLI), a due training runs here and its train flow result is returned;
    without (the dashboard), it starts in a background process, returned as BackgroundRetrain.
    None: events were emitted, or the task is not due. ``rt``: the caller's runtime, if it has
    one open (else one is opened from the environment's settings).
    """
    if (mode or trigger_mode()) == "event":
        for _ in range(count):
            emit_event(event=LABEL_EVENT, resource=task_resource(task_name))
        return None
    # Checked here first, cheaply: most labels do not make a task due, and a flow run costs more.
    with contextlib.nullcontext(rt) if rt else Runtime.open(Settings()) as runtime:
        with unit_of_work(runtime.session_factory) as session:
            due = retrain_status(session, task_name, runtime.settings.retrain_after_labels).due
        data_dir = runtime.settings.data_dir
    if not due:
        return None
    if not wait:
        return start_background_retrain(data_dir, task_name)
    from flows.embedded import run_settings
    from flows.train import train_flow

    with run_settings():
        result: dict[str, Any] = train_flow(task_name, progress=False, if_due=True)
    return result if result.get("trained") else None


def start_background_retrain(data_dir: Path, task_name: str) -> BackgroundRetrain:
    """``radflow retrain --task T --if-due`` as a detached process, logging to the data dir.

    It reads the same RADFLOW_* environment as its caller, decides again whether the task is
    due, and trains at most once however many reviews started it: a second one finds the first
    training running (radflow.learning.training.running_run, the Prefect concurrency limit), or no
    new
    labels left once it is done (flows/train.py checks again inside the limit).
    """
    log = data_dir / "logs" / f"retrain-{task_name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = ["retrain", "--task", task_name, "--if-due", "--no-progress"]
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", *command],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives the dashboard (a restart, a closed tab)
        )
    # Collect its exit status when it ends, so a long-lived caller (the dashboard server)
    # does not keep a zombie process per retraining.
    threading.Thread(target=process.wait, name=f"retrain-{task_name}", daemon=True).start()
    logger.info("%s is due: retraining in process %d (log %s)", task_name, process.pid, log)
    return BackgroundRetrain(task_name, process.pid, log)


def retrain_triggers(
    threshold: int, tasks: Sequence[str] | None = None
) -> list[DeploymentEventTrigger]:
    """One trigger per task: ``threshold`` label events within a week start the train flow."""
    return [
        DeploymentEventTrigger(
            name=f"{threshold} new labels -> retrain {task_name}",
            expect={LABEL_EVENT},
            match={"prefect.resource.id": f"radflow.task.{task_name}"},
            threshold=threshold,
            within=timedelta(days=7),
            parameters={"task_name": task_name, "if_due": True, "progress": False},
        )
        for task_name in sorted(tasks or TASKS)
    ]


def retrain_deployment(train_flow: Any, threshold: int) -> RunnerDeployment:
    """The train flow with ``if_due``: started by label events, hourly per task as a catch-up."""
    deployment: RunnerDeployment = train_flow.to_deployment(
        name="retrain",
        triggers=retrain_triggers(threshold),
        schedules=[
            Interval(
                timedelta(hours=1),
                parameters={"task_name": task_name, "if_due": True, "progress": False},
            )
            for task_name in sorted(TASKS)
        ],
    )
    return deployment
