"""Train flow: labelled studies -> a new model version, evaluated against the champion.

At most one training per task at a time, wherever it was started (a deployment run, `radflow
train`, the dashboard): the training holds the task's lease in the database
(radflow.learning.retrain), renewed while it runs, so a crashed training stops blocking within
a minute (its run is marked abandoned, its flow run Crashed). A training asked for while
another runs waits for it, saying what it waits for; a due check (``if_due``) does not wait:
the running training uses the labels. Once a new champion is registered, the studies that
waited for it are scored (flows.launcher.reconcile).
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from flows.launcher import crash_dead_run, holder, reconcile
from radflow import leases
from radflow.db import ModelStatus, unit_of_work
from radflow.learning import training
from radflow.learning.retrain import lease_name, retrain_status, running_run
from radflow.learning.tasks import default_task, get_task
from radflow.runtime import Runtime
from radflow.settings import Settings

WAIT_POLL_SECONDS = 2.0
WAIT_REPORT_SECONDS = 30.0


def wait_for_running_training(rt: Runtime, task_name: str, logger: Any) -> None:
    """Return once no live training of ``task_name`` holds its lease, saying what it waits for
    (at once, then every 30 s): the running training, or its lease expiring if it died."""
    reported = 0.0
    while True:
        with rt.session_factory() as session:
            lease = leases.read(session, lease_name(task_name))
            busy = running_run(session, task_name)
        if lease is None or not lease.live():
            return
        if time.monotonic() - reported >= WAIT_REPORT_SECONDS:
            run = f"training run {busy.id}" if busy is not None else "a training"
            logger.info(
                "waiting for %s of %s, held by %s; if its process died, the lease expires "
                "by itself (`radflow training abandon RUN_ID` ends it now)",
                run,
                task_name,
                lease.describe(),
            )
            reported = time.monotonic()
        time.sleep(WAIT_POLL_SECONDS)


@task(cache_policy=NO_CACHE)
def train_version(rt: Runtime, task_name: str, progress: bool) -> dict[str, Any]:
    epochs = get_task(task_name).plan.epochs
    artifact = create_progress_artifact(
        0.0, key=f"{task_name}-training-progress", description=f"Training {task_name}"
    )

    def on_epoch(row: dict[str, float]) -> None:
        update_progress_artifact(artifact, 100.0 * row["epoch"] / epochs)

    version = training.train_task(
        rt.settings,
        rt.session_factory,
        rt.store,
        task_name,
        progress=progress,
        on_epoch=on_epoch,
        holder=holder(),
        taken_over=crash_dead_run,
    )
    with unit_of_work(rt.session_factory) as session:
        history = training.run_history(session, version)
    return training.summary(version, history)


@flow(name="train")
def train_flow(
    task_name: str | None = None,
    progress: bool = True,
    if_due: bool = False,
    score_waiting: bool = True,
) -> dict[str, Any]:
    """Train ``task_name`` (default: the registry's default task); with ``if_due``, only when
    enough new labels have arrived. With ``score_waiting``, a new champion starts the scoring
    of the studies that waited for it (in the background); a benchmark that measures scoring
    itself turns that off."""
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
        if not if_due:
            wait_for_running_training(rt, task_name, logger)
        result = train_version(rt, task_name, progress)
        if score_waiting and result["status"] == ModelStatus.CHAMPION:
            # Studies that waited for a champion (the first, or a better one) are scored now.
            reconcile(rt, training=False)
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
