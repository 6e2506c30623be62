"""The model registry: trained networks as numbered versions per task, one champion at a time."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from importlib.metadata import version as package_version
from typing import Any

import numpy as np
import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from torch import nn

from radflow.db import (
    AuditEvent,
    ModelEvaluation,
    ModelStatus,
    ModelVersion,
    TrainingRun,
    unit_of_work,
)
from radflow.db.audit import record
from radflow.errors import NoChampion, RadflowError
from radflow.learning.evaluation import Decision, decide
from radflow.learning.tasks import Task
from radflow.store import ObjectStore, keys

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

    Whether a challenger beats the champion is decided by evaluation (``judge``), not here.
    ``parent`` is the champion the version was meant to replace.
    """
    number = (
        session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.task == task.name))
        or 0
    ) + 1
    weights_key = keys.model(task.name, number, WEIGHTS_NAME)
    save_weights(store, weights_key, network)
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


def save_weights(store: ObjectStore, key: str, network: nn.Module) -> None:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, buffer)
    store.put_bytes(key, buffer.getvalue())


class UnknownVersion(RadflowError, LookupError):
    def __init__(self, task: str, number: int) -> None:
        super().__init__(
            f"{task} has no version {number}; `radflow model list --task {task}` shows them"
        )


def get_version(session: Session, task: str, number: int) -> ModelVersion:
    found = session.scalar(
        select(ModelVersion).where(ModelVersion.task == task, ModelVersion.version == number)
    )
    if found is None:
        raise UnknownVersion(task, number)
    return found


def versions(session: Session, task: str) -> list[ModelVersion]:
    return list(
        session.scalars(
            select(ModelVersion).where(ModelVersion.task == task).order_by(ModelVersion.version)
        )
    )


def latest_evaluation(session: Session, version: ModelVersion) -> ModelEvaluation | None:
    return session.scalar(
        select(ModelEvaluation)
        .where(ModelEvaluation.model_version_id == version.id)
        .order_by(ModelEvaluation.id.desc())
        .limit(1)
    )


def promote(session: Session, version: ModelVersion, *, actor: str, reason: str) -> None:
    """Make ``version`` the champion; the previous champion is retired (rollback restores it)."""
    current = champion(session, version.task)
    if current is not None and current.id == version.id:
        return
    if current is not None:
        current.status = ModelStatus.RETIRED
        session.flush()  # one champion at a time, even within this transaction
    version.status = ModelStatus.CHAMPION
    session.add(
        record(
            actor,
            "promote",
            "model_version",
            version.name,
            task=version.task,
            previous=current.name if current else None,
            reason=reason,
        )
    )
    logger.info("%s is now champion (%s)", version.name, reason)


def rollback(session: Session, task: str, *, actor: str) -> ModelVersion:
    """Restore the champion the current one replaced; the current one becomes a challenger."""
    current = require_champion(session, task)
    promoted = session.scalar(
        select(AuditEvent)
        .where(
            AuditEvent.action == "promote",
            AuditEvent.object_type == "model_version",
            AuditEvent.object_id == current.name,
        )
        .order_by(AuditEvent.id.desc())
        .limit(1)
    )
    previous_name = promoted.details.get("previous") if promoted is not None else None
    if not previous_name:
        raise RadflowError(
            f"{current.name} did not replace another champion: nothing to roll back to; "
            f"promote a version by hand with `radflow model promote {task} VERSION`"
        )
    previous = get_version(session, task, int(str(previous_name).rsplit(":v", 1)[1]))
    current.status = ModelStatus.CHALLENGER
    session.flush()
    previous.status = ModelStatus.CHAMPION
    session.add(
        record(
            actor,
            "rollback",
            "model_version",
            current.name,
            task=task,
            restored=previous.name,
        )
    )
    logger.info("rolled back %s to %s", current.name, previous.name)
    return previous


def judge(
    session: Session,
    version: ModelVersion,
    current: ModelVersion | None,
    targets: np.ndarray,
    scores: np.ndarray,
    champion_scores: np.ndarray | None,
    *,
    alpha: float,
    actor: str,
) -> ModelEvaluation:
    """Decide champion or challenger on the evaluation set, and record why."""
    decision = decide(targets, scores, champion_scores, alpha)
    return record_decision(
        session, version, current, decision, len(targets), alpha=alpha, actor=actor
    )


def record_decision(
    session: Session,
    version: ModelVersion,
    current: ModelVersion | None,
    decision: Decision,
    n_studies: int,
    *,
    alpha: float,
    actor: str,
) -> ModelEvaluation:
    """Store a decision on ``version`` (and promote it when the decision says so).

    ``auc`` / ``champion_auc`` hold the paired test's metric: the AUC for classification, the
    mean Dice for segmentation (radflow.learning.evaluation.decide_dice).
    """
    evaluation = ModelEvaluation(
        model_version_id=version.id,
        champion_version_id=current.id if current else None,
        task=version.task,
        n_studies=n_studies,
        auc=float(decision.test.auc_new if decision.test else version.metrics.get("auc", 0.0)),
        champion_auc=decision.test.auc_old if decision.test else None,
        p_value=decision.test.p_value if decision.test else None,
        alpha=alpha,
        promoted=decision.promote,
        reason=decision.reason[:512],
        metrics=dict(version.metrics),
    )
    session.add(evaluation)
    version.metrics = {**version.metrics, "decision": decision.reason}
    if decision.promote and current is not None:
        promote(session, version, actor=actor, reason=decision.reason)
    session.flush()
    return evaluation


def epoch_recorder(
    session_factory: sessionmaker[Session],
    run_id: int,
    on_epoch: Callable[[dict[str, float]], None] | None,
) -> tuple[list[dict[str, float]], Callable[[dict[str, float]], None]]:
    """The history of a training run and the callback that grows it: each epoch's row is saved
    to the run as it comes (a long training shows its curve while it runs), then passed on."""
    history: list[dict[str, float]] = []

    def record_epoch(row: dict[str, float]) -> None:
        history.append(row)
        with unit_of_work(session_factory) as session:
            session.get_one(TrainingRun, run_id).history = {"epochs": list(history)}
        if on_epoch:
            on_epoch(row)

    return history, record_epoch
