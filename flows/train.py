"""Train flow: labelled studies -> a new registered model version."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from radflow import training
from radflow.runtime import Runtime
from radflow.settings import Settings


@task(cache_policy=NO_CACHE)
def train_version(rt: Runtime, task_name: str, progress: bool) -> dict[str, object]:
    version = training.train_task(
        rt.settings, rt.session_factory, rt.store, task_name, progress=progress
    )
    return training.summary(version)


@flow(name="train")
def train_flow(task_name: str = "pneumonia-cxr", progress: bool = True) -> dict[str, object]:
    logger = get_run_logger()
    with Runtime.open(Settings()) as rt:
        result = train_version(rt, task_name, progress)
    create_table_artifact(
        key=f"{task_name}-metrics",
        table=[{k: str(v) for k, v in result.items()}],
        description=f"Validation metrics of {result['model']}",
    )
    logger.info("trained %s (%s): val AUC %.3f", result["model"], result["status"], result["auc"])
    return result
