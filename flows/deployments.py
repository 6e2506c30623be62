"""Deployments: the flows served to a Prefect server by `radflow worker`."""

from __future__ import annotations

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.events import DeploymentEventTrigger

from flows.ingest import ingest_flow
from flows.process import process_flow
from flows.retrain import retrain_deployment
from flows.train import train_flow
from flows.trigger import STABLE_EVENT
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
