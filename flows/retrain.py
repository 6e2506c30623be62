"""What starts a retraining when labels arrive: the one place that decides.

- A Prefect server runs (``PREFECT_API_URL`` set): one ``radflow.label.created`` event per
  label; the ``retrain`` deployment's trigger (threshold: ``retrain_after_labels`` events) starts
  the train flow with ``if_due``, and an hourly schedule on the same deployment catches up on
  anything the events missed (a server restart, labels written while no server ran).
- The embedded default (no server): after labels are recorded, the due check runs here and,
  when due, the train flow is called directly.

Either way the train flow itself decides from the database whether the task is due, so a
trigger that fires twice, or late, trains at most once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger, emit_event
from prefect.schedules import Interval

from flows.trigger import TriggerMode, trigger_mode
from radflow.db import unit_of_work
from radflow.retrain import retrain_status
from radflow.runtime import Runtime
from radflow.settings import Settings
from radflow.tasks import TASKS

logger = logging.getLogger(__name__)

LABEL_EVENT = "radflow.label.created"


def task_resource(task_name: str) -> dict[str, str]:
    # The task, not the study: events are kept by Prefect, outside the clinical store.
    return {"prefect.resource.id": f"radflow.task.{task_name}", "radflow.task": task_name}


def labels_recorded(
    task_name: str, count: int = 1, *, mode: TriggerMode | None = None
) -> dict[str, Any] | None:
    """Announce ``count`` new labels; on the embedded default, retrain now if due.

    Returns the train flow's result when a training ran here, else None.
    """
    if (mode or trigger_mode()) == "event":
        for _ in range(count):
            emit_event(event=LABEL_EVENT, resource=task_resource(task_name))
        return None
    from flows.train import train_flow

    # Checked here first, cheaply: most labels do not make a task due, and a flow run costs more.
    with Runtime.open(Settings()) as rt, unit_of_work(rt.session_factory) as session:
        due = retrain_status(session, task_name, rt.settings.retrain_after_labels).due
    if not due:
        return None
    result: dict[str, Any] = train_flow(task_name, progress=False, if_due=True)
    return result if result.get("trained") else None


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
