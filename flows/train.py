"""Train flow: labelled studies -> a new model version, evaluated against the champion.

At most one training per task at a time: the flow holds the Prefect global concurrency limit
``train-<task>`` (created with limit 1 on first use) while it trains, and the library refuses a
second run while the database shows one running (radflow.learning.retrain.running_run), which also
covers trainings started outside Prefect.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound

from radflow.db import unit_of_work
from radflow.learning import training
from radflow.learning.retrain import retrain_status
from radflow.learning.tasks import default_task, get_task
from radflow.runtime import Runtime
from radflow.settings import Settings


def concurrency_limit_name(task_name: str) -> str:
    return f"train-{task_name}"


def ensure_concurrency_limit(task_name: str) -> str:
    """The task's global concurrency limit (1 slot), created if the server does not have it."""
    name = concurrency_limit_name(task_name)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    return name


@task(cache_policy=NO_CACHE)
def train_version(rt: Runtime, task_name: str, progress: bool) -> dict[str, Any]:
    epochs = get_task(task_name).plan.epochs
    artifact = create_progress_artifact(
        0.0, key=f"{task_name}-training-progress", description=f"Training {task_name}"
    )

    def on_epoch(row: dict[str, float]) -> None:
        update_progress_artifact(artifact, 100.0 * row["epoch"] / epochs)

    version = training.train_task(
        rt.settings, rt.session_factory, rt.store, task_name, progress=progress, on_epoch=on_epoch
    )
    with unit_of_work(rt.session_factory) as session:
        history = training.run_history(session, version)
    return training.summary(version, history)


@flow(name="train")
def train_flow(
    task_name: str | None = None, progress: bool = True, if_due: bool = False
) -> dict[str, Any]:
    """Train ``task_name`` (default: the registry's default task); with ``if_due``, only when
    enough new labels have arrived."""
    logger = get_run_logger()
    task_name = task_name or default_task().name
    with Runtime.open(Settings()) as rt:

        def not_due() -> str | None:
            with unit_of_work(rt.session_factory) as session:
                status = retrain_status(session, task_name, rt.settings.retrain_after_labels)
            logger.info(status.describe())
            return None if status.due else status.describe()

        if if_due and (reason := not_due()):
            return {"trained": False, "reason": reason}
        with concurrency(ensure_concurrency_limit(task_name), occupy=1):
            # Again once the slot is ours: a training that held it may have used the labels.
            if if_due and (reason := not_due()):
                return {"trained": False, "reason": reason}
            result = train_version(rt, task_name, progress)
    create_table_artifact(
        key=f"{task_name}-epochs",
        table=result.pop("history"),
        description=f"Per-epoch training metrics of {result['model']}",
    )
    create_table_artifact(
        key=f"{task_name}-metrics",
        table=[{k: str(v) for k, v in result.items()}],
        description=f"Evaluation of {result['model']}: {result.get('decision', '')}",
    )
    logger.info(
        "trained %s (%s): val AUC %.3f; %s",
        result["model"],
        result["status"],
        result["auc"],
        result.get("decision", ""),
    )
    return {"trained": True, **result}
