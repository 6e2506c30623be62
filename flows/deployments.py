"""Deployments: the flows served to a Prefect server by `radflow worker`.

A worker serves one pool of deployments (``--pool``): ``process`` (ingest and scoring, on any
machine), ``train`` (training and retraining: the GPU machine in production), or ``all`` (one
machine doing everything). Workers share only PostgreSQL, the object store and the Prefect
server, so any number of them can serve the same pool.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Literal

from prefect.automations import Automation
from prefect.client.schemas.objects import (
    ConcurrencyLimitConfig,
    ConcurrencyLimitStrategy,
    StateType,
)
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.runner import Runner
from prefect.schedules import Interval

from flows.deliver import deliver_flow
from flows.ingest import ingest_flow
from flows.launcher import LABEL_EVENT, SCORED_EVENT, STABLE_EVENT, STABLE_RESOURCE
from flows.listener import Listener
from flows.process import process_flow
from flows.train import train_flow
from radflow.learning.tasks import TASKS
from radflow.settings import Settings

Pool = Literal["all", "process", "train"]
POOLS: tuple[Pool, ...] = ("all", "process", "train")

PROCESS_INTERVAL = timedelta(seconds=60)
"""The reconciler's beat for scoring: a process run every minute scores whatever stable study
no event started (each event starts one at once)."""
RETRAIN_INTERVAL = timedelta(hours=1)

HEARTBEAT_SECONDS = 30
"""How often the flow runs a worker starts send a heartbeat (Prefect's minimum; its default 180)."""
ZOMBIE_AUTOMATION = "radflow: crash flow runs whose heartbeats stopped"
ZOMBIE_AFTER = timedelta(seconds=3 * HEARTBEAT_SECONDS)


def deployments(pool: Pool, settings: Settings) -> list[RunnerDeployment]:
    """The deployments a worker of ``pool`` serves."""
    chosen: list[RunnerDeployment] = []
    if pool in ("all", "process"):
        chosen += [
            ingest_flow.to_deployment(name="ingest"),
            # No concurrency limit: a run holds each task's scoring lease (flows/process.py), so
            # runs never score the same study twice, and a dead worker blocks nothing for long
            # (a deployment slot held by a killed run stayed taken for 5 minutes).
            process_flow.to_deployment(
                name="process",
                schedules=[Interval(PROCESS_INTERVAL)],
                triggers=[stable_study_trigger()],
            ),
            # Started by each process run that scored (its event); every minute as the safety
            # net, and for results whose sending failed, due again after their backoff.
            deliver_flow.to_deployment(
                name="deliver",
                interval=60,
                triggers=[scored_trigger()],
                concurrency_limit=ConcurrencyLimitConfig(
                    limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
                ),
            ),
        ]
    if pool in ("all", "train"):
        chosen += [
            train_flow.to_deployment(name="train"),
            retrain_deployment(train_flow, settings.retrain_after_labels),
        ]
    return chosen


def serve_all(
    settings: Settings, pool: Pool = "all", *, registered: Callable[[], object] | None = None
) -> None:
    """Register the pool's deployments, call ``registered`` (the start-up reconcile), then run
    whatever the server schedules for them until stopped.

    The runner asks the server for work every ``worker_poll_seconds`` (Prefect's default, 10 s,
    was most of a study's latency). Schedules are not paused when a worker stops: other workers
    may still serve them.
    """
    # Inherited by every flow run process the runner starts (Prefect's own setting).
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_SECONDS))
    # Listening first: a restarted worker scores what waits before registering its deployments.
    listener = Listener(settings).start() if pool != "train" and settings.worker_listens else None
    try:
        ensure_zombie_automation()
        runner = Runner(
            pause_on_shutdown=False, query_seconds=settings.worker_poll_seconds, limit=None
        )
        for deployment in deployments(pool, settings):
            runner.add_deployment(deployment)
        if registered is not None:
            registered()
        asyncio.run(runner.start())
    finally:
        if listener is not None:
            listener.stop()


def zombie_automation() -> Automation:
    """Prefect's recipe for zombie flow runs: a run that sent a heartbeat and then neither
    another one nor a final state within :data:`ZOMBIE_AFTER` is marked Crashed.

    A killed worker takes its flow runs' processes with it. A run that held a lease is marked
    Crashed by the run that takes the lease over (flows.launcher.crash_dead_run), within
    seconds; this catches the others (killed before taking a lease, a deliver or train run),
    which the server would otherwise show Running for good.
    """
    finals = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    return Automation(
        name=ZOMBIE_AUTOMATION,
        description="Flow runs of a dead worker: no heartbeat, no final state",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *finals},
            match={"prefect.resource.id": ["prefect.flow-run.*"]},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=ZOMBIE_AFTER,
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {ZOMBIE_AFTER.total_seconds():g} s: its worker died",
            )
        ],
    )


def ensure_zombie_automation() -> None:
    """Create :func:`zombie_automation` on the server unless a worker already did."""
    try:
        Automation.read(name=ZOMBIE_AUTOMATION)
    except ValueError:  # Prefect's "not found"
        zombie_automation().create()


def stable_study_trigger() -> DeploymentEventTrigger:
    """Each radflow.study.stable event (one per pass of the receiver, flows/trigger.py) starts
    a process run for every task with a champion."""
    return DeploymentEventTrigger(
        name="stable studies -> process",
        expect={STABLE_EVENT},
        match={"prefect.resource.id": STABLE_RESOURCE},
    )


def scored_trigger() -> DeploymentEventTrigger:
    """A process run that recorded predictions (flows/process.py) runs deliver: their SRs."""
    return DeploymentEventTrigger(
        name="predictions recorded -> deliver",
        expect={SCORED_EVENT},
        match={"prefect.resource.id": "radflow.predictions"},
    )


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
                RETRAIN_INTERVAL,
                parameters={"task_name": task_name, "if_due": True, "progress": False},
            )
            for task_name in sorted(TASKS)
        ],
    )
    return deployment
