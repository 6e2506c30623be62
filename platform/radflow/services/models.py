"""The models page: versions per task, their evaluation, runtime variants, promotion, serving,
rollback and retraining.

Evaluation is computed from what the database holds: each version's predictions on studies that
carry a label, preferring labels the version was not trained on (reviews after its training).
Promotion and rollback change ``ModelVersion.status`` here, audited; the learning loop's
evaluation gate decides automatically, these are the ML engineer's manual overrides. Serving
chooses the runtime a version scores in (radflow.learning.variants), among the variants that
passed their non-inferiority check; it is audited and rolled back the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from radflow.db import (
    Label,
    ModelStatus,
    ModelVariant,
    ModelVersion,
    Prediction,
    TrainingRun,
    VariantRuntime,
)
from radflow.db.audit import record
from radflow.errors import RadflowError
from radflow.learning import registry, variants
from radflow.learning.tasks import get_task
from radflow.services.users import Permission, Principal, require

logger = logging.getLogger(__name__)

CALIBRATION_BINS = 10
MIN_REASON_LENGTH = 10


class PromotionNeedsReason(RadflowError, ValueError):
    """A promotion against the statistical decision, without a written reason."""

    def __init__(self, name: str, p_value: float, alpha: float) -> None:
        super().__init__(
            f"{name} did not beat the champion (DeLong p = {p_value:.3g} >= alpha {alpha:g}): "
            f"promoting it anyway needs a reason of at least {MIN_REASON_LENGTH} characters, "
            "which the audit trail records"
        )
        self.p_value, self.alpha = p_value, alpha


@dataclass(frozen=True)
class VariantSummary:
    """One runtime of a version as measured on the task's evaluation set."""

    runtime: str
    size_mb: float
    images_per_second: float | None
    speedup: float | None
    """Throughput over the PyTorch weights', measured in the same run."""
    auc: float | None
    auc_delta: float | None
    """Its AUC minus the PyTorch weights' AUC on the same studies."""
    passed: bool
    serving: bool
    reason: str


@dataclass(frozen=True)
class VersionSummary:
    id: int
    task: str
    version: int
    status: str
    threshold: float
    metrics: dict[str, Any]
    created_at: datetime
    label_snapshot: int
    """How many labels the version was trained on (0 if unknown)."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Per-epoch rows of its training run (epoch, train_loss, val_auc, ...)."""
    variants: list[VariantSummary] = field(default_factory=list)
    """Its runtime variants (empty until compressed), PyTorch fp32 first."""

    @property
    def serving(self) -> str:
        """The runtime it scores in (while champion)."""
        chosen = next((v.runtime for v in self.variants if v.serving), None)
        return chosen or VariantRuntime.TORCH_FP32.value

    @property
    def name(self) -> str:
        return f"{self.task}:v{self.version}"


@dataclass(frozen=True)
class Evaluation:
    """A version's predictions against labels: ROC, confusion matrix, calibration."""

    n: int
    held_out: bool
    """True if only labels the version was not trained on were used."""
    fpr: list[float]
    tpr: list[float]
    auc: float | None
    confusion: dict[str, int]
    """tp, fp, tn, fn at the version's threshold."""
    calibration: list[tuple[float, float, int]]
    """(mean predicted probability, observed positive fraction, count) per non-empty bin."""


def list_versions(session: Session, principal: Principal) -> dict[str, list[VersionSummary]]:
    """Every model version grouped by task, newest first."""
    require(principal, Permission.VIEW_MODELS)
    rows = session.execute(
        select(ModelVersion, TrainingRun)
        .outerjoin(TrainingRun, TrainingRun.id == ModelVersion.training_run_id)
        .order_by(ModelVersion.task, ModelVersion.version.desc())
    ).all()
    by_version: dict[int, list[VariantSummary]] = {}
    order = list(VariantRuntime)
    for variant in sorted(
        session.scalars(select(ModelVariant)), key=lambda v: order.index(v.runtime)
    ):
        by_version.setdefault(variant.model_version_id, []).append(_variant(variant))
    out: dict[str, list[VersionSummary]] = {}
    for version, run in rows:
        out.setdefault(version.task, []).append(
            _summary(version, run, by_version.get(version.id, []))
        )
    return out


def _variant(variant: ModelVariant) -> VariantSummary:
    metrics = variant.metrics or {}

    def number(name: str) -> float | None:
        value = metrics.get(name)
        return float(value) if isinstance(value, int | float) else None

    return VariantSummary(
        runtime=variant.runtime.value,
        size_mb=variant.size_bytes / 1e6,
        images_per_second=number("images_per_second"),
        speedup=number("speedup"),
        auc=number("auc"),
        auc_delta=number("auc_delta"),
        passed=variant.passed,
        serving=variant.serving,
        reason=variant.reason,
    )


def _summary(
    version: ModelVersion, run: TrainingRun | None, variants: list[VariantSummary]
) -> VersionSummary:
    epochs = (run.history or {}).get("epochs", []) if run is not None else []
    return VersionSummary(
        id=version.id,
        task=version.task,
        version=version.version,
        status=ModelStatus(version.status).value,
        threshold=version.threshold,
        metrics=dict(version.metrics or {}),
        created_at=version.created_at,
        label_snapshot=len(run.label_ids) if run is not None else 0,
        history=[dict(row) for row in epochs if isinstance(row, dict)],
        variants=variants,
    )


def evaluate(session: Session, principal: Principal, version_id: int) -> Evaluation | None:
    """The version's ROC, confusion matrix and calibration; None if no labelled study was scored."""
    require(principal, Permission.VIEW_MODELS)
    version = session.get_one(ModelVersion, version_id)
    task = get_task(version.task)
    latest_label = (
        select(func.max(Label.id))
        .where(Label.task == version.task)
        .group_by(Label.study_id)
        .scalar_subquery()
    )
    pairs = session.execute(
        select(Prediction.score, Label.value, Label.id)
        .join(Label, Label.study_id == Prediction.study_id)
        .where(Prediction.model_version_id == version.id, Label.id.in_(latest_label))
    ).all()
    if not pairs:
        return None
    trained_on = _trained_label_ids(session, version)
    held_out = [(s, v) for s, v, label_id in pairs if str(label_id) not in trained_on]
    use = held_out or [(s, v) for s, v, _ in pairs]
    scores = np.array([s for s, _ in use], dtype=np.float64)
    targets = np.array([task.target(v) for _, v in use], dtype=np.int64)
    return Evaluation(
        n=len(use),
        held_out=bool(held_out),
        **_roc(targets, scores),
        confusion=_confusion(targets, scores, version.threshold),
        calibration=_calibration(targets, scores),
    )


def _trained_label_ids(session: Session, version: ModelVersion) -> set[str]:
    if version.training_run_id is None:
        return set()
    run = session.get(TrainingRun, version.training_run_id)
    return set(run.label_ids) if run is not None else set()


def _roc(targets: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    if len(np.unique(targets)) < 2:
        return {"fpr": [], "tpr": [], "auc": None}
    fpr, tpr, _ = roc_curve(targets, scores)
    return {
        "fpr": fpr.tolist(),
        "tpr": tpr.tolist(),
        "auc": float(np.trapezoid(tpr, fpr)),
    }


def _confusion(targets: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, int]:
    predicted = scores >= threshold
    actual = targets == 1
    return {
        "tp": int((predicted & actual).sum()),
        "fp": int((predicted & ~actual).sum()),
        "tn": int((~predicted & ~actual).sum()),
        "fn": int((~predicted & actual).sum()),
    }


def _calibration(targets: np.ndarray, scores: np.ndarray) -> list[tuple[float, float, int]]:
    bins = np.clip((scores * CALIBRATION_BINS).astype(int), 0, CALIBRATION_BINS - 1)
    out = []
    for b in range(CALIBRATION_BINS):
        inside = bins == b
        if inside.any():
            out.append(
                (float(scores[inside].mean()), float(targets[inside].mean()), int(inside.sum()))
            )
    return out


def labels_since_training(session: Session, task: str) -> int:
    """Labels of ``task`` newer than the newest label the latest training run used."""
    run = session.scalar(
        select(TrainingRun)
        .where(TrainingRun.task == task, TrainingRun.status == "completed")
        .order_by(TrainingRun.id.desc())
        .limit(1)
    )
    query = select(func.count(Label.id)).where(Label.task == task)
    if run is not None and run.label_ids:
        newest = max(int(i) for i in run.label_ids)
        query = query.where(Label.id > newest)
    return session.scalar(query) or 0


def against_decision(session: Session, task: str, version: int) -> tuple[float, float] | None:
    """(p, alpha) if the version's latest comparison with the champion did not favour it."""
    evaluation = registry.latest_evaluation(session, registry.get_version(session, task, version))
    if evaluation is None or evaluation.p_value is None or evaluation.p_value < evaluation.alpha:
        return None
    return evaluation.p_value, evaluation.alpha


def promote(
    session: Session, principal: Principal, task: str, version: int, reason: str | None = None
) -> ModelVersion:
    """Make ``task`` version ``version`` the champion (the registry retires the previous one).

    Against the statistical decision (its DeLong test did not pass), only with a typed
    ``reason``, recorded in the audit event with the test's p-value.
    """
    require(principal, Permission.PROMOTE)
    target = registry.get_version(session, task, version)
    reason = (reason or "").strip()
    against = against_decision(session, task, version)
    if against is not None:
        p_value, alpha = against
        if len(reason) < MIN_REASON_LENGTH:
            raise PromotionNeedsReason(target.name, p_value, alpha)
        reason = f"against the statistical decision (p = {p_value:.3g} >= {alpha:g}): {reason}"
    registry.promote(session, target, actor=principal.name, reason=reason or "promoted by hand")
    return target


def rollback(session: Session, principal: Principal, task: str) -> ModelVersion:
    """Put back the champion the current one replaced (the registry's rule, audited there)."""
    require(principal, Permission.PROMOTE)
    return registry.rollback(session, task, actor=principal.name)


def serve(session: Session, principal: Principal, task: str, version: int, runtime: str) -> str:
    """Make ``runtime`` the one ``task`` version ``version`` scores in; returns the one before.
    Only a variant that passed its non-inferiority check may (the variants module's rule)."""
    require(principal, Permission.PROMOTE)
    target = registry.get_version(session, task, version)
    return variants.serve(session, target, runtime, actor=principal.name).value


def rollback_serving(session: Session, principal: Principal, task: str) -> str:
    """Serve again the runtime the champion served before its runtime was last chosen."""
    require(principal, Permission.PROMOTE)
    return variants.rollback_serving(session, task, actor=principal.name).value


def request_retrain(session: Session, principal: Principal, task: str) -> None:
    """Check the permission and audit the request; the caller commits, then starts the
    training (flows/launcher.py ``start_training``: the core does not start flows)."""
    require(principal, Permission.RETRAIN)
    get_task(task)  # unknown tasks fail here, before anything starts
    session.add(record(principal.name, "retrain", "task", task))
