"""Deployments: the flows served to a Prefect server by `radflow worker`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.schedules import Interval

from flows.deliver import deliver_flow
from flows.ingest import ingest_flow
from flows.launcher import LABEL_EVENT, STABLE_EVENT
from flows.process import process_flow
from flows.train import train_flow
from radflow.learning.tasks import TASKS
from radflow.settings import Settings


def serve_all() -> None:
    """Serve every flow; the Prefect server schedules runs and this process executes them."""
    serve(
        ingest_flow.to_deployment(name="ingest"),
        process_flow.to_deployment(
            name="process",
            interval=60,  # the safety net; stable-study events start runs at once
            triggers=stable_study_triggers(),
            # A burst of stable studies would start a run per event; one run scores every stable
            # study (it loops until none is left), so a run starting while one runs is dropped.
            concurrency_limit=ConcurrencyLimitConfig(
                limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
            ),
        ),
        # Results whose sending failed are due again after their backoff: retried from here.
        deliver_flow.to_deployment(
            name="deliver",
            interval=60,
            concurrency_limit=ConcurrencyLimitConfig(
                limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
            ),
        ),
        # One training per task at a time: the flow holds the global limit train-<task>.
        train_flow.to_deployment(name="train"),
        retrain_deployment(train_flow, Settings().retrain_after_labels),
    )


def stable_study_triggers() -> list[DeploymentEventTrigger]:
    """One trigger per task: each radflow.study.stable event (flows/trigger.py) runs process."""
    return [
        DeploymentEventTrigger(
            name=f"stable study -> {task_name}",
            expect={STABLE_EVENT},
            match={"prefect.resource.id": "radflow.study.*"},
            parameters={"task_name": task_name},
        )
        for task_name in sorted(TASKS)
    ]


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
