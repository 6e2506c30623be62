"""The model registry: trained networks as numbered versions per task, one champion at a time."""

from __future__ import annotations

import io
import logging
from importlib.metadata import version as package_version
from typing import Any

import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from torch import nn

from radflow.db import ModelStatus, ModelVersion, TrainingRun
from radflow.db.audit import record
from radflow.errors import NoChampion
from radflow.store import ObjectStore, keys
from radflow.tasks import Task, get_task

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.pt"


def champion(session: Session, task: str) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion).where(
            ModelVersion.task == task, ModelVersion.status == ModelStatus.CHAMPION
        )
    )


def require_champion(session: Session, task: str) -> ModelVersion:
    found = champion(session, task)
    if found is None:
        raise NoChampion(task)
    return found


def register(
    session: Session,
    store: ObjectStore,
    task: Task,
    network: nn.Module,
    *,
    metrics: dict[str, Any],
    threshold: float,
    training_run: TrainingRun | None,
    actor: str = "radflow",
) -> ModelVersion:
    """Store the weights and add a version; it becomes champion only if the task has none.

    Whether a challenger beats the champion is decided by evaluation, not here.
    """
    number = (
        session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.task == task.name))
        or 0
    ) + 1
    weights_key = keys.model(task.name, number, WEIGHTS_NAME)
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, buffer)
    store.put_bytes(weights_key, buffer.getvalue())
    current = champion(session, task.name)
    version = ModelVersion(
        task=task.name,
        version=number,
        status=ModelStatus.CHALLENGER if current else ModelStatus.CHAMPION,
        weights_key=weights_key,
        config=task.describe(),
        metrics=metrics,
        threshold=threshold,
        training_run_id=training_run.id if training_run else None,
        parent_id=current.id if current else None,
        code_version=package_version("radflow"),
    )
    session.add(version)
    session.flush()
    session.add(record(actor, "register", "model_version", version.name, status=version.status))
    logger.info("registered %s as %s", version.name, version.status)
    return version


def load_network(store: ObjectStore, version: ModelVersion, device: torch.device) -> nn.Module:
    """The version's network with its weights, in eval mode on ``device``."""
    network = get_task(version.task).build_network()
    state = torch.load(io.BytesIO(store.get_bytes(version.weights_key)), map_location="cpu")
    network.load_state_dict(state)
    network.to(device).eval()
    return network
