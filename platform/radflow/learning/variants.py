"""Runtime variants in the registry: which a version has, which one serves, and rolling back.

A version scores through at most one serving variant (radflow.db.ModelVariant.serving), and
only while it is its task's champion; with none, its PyTorch fp32 weights score. Choosing a
variant (:func:`serve`) and undoing that choice (:func:`rollback_serving`) are audited like a
promotion and its rollback. Variants are made and judged by radflow.learning.compression; only
one that passed its non-inferiority check may serve.

No PyTorch or ONNX Runtime here: the dashboard's services and scoring read it.
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from radflow.db import AuditEvent, ModelVariant, ModelVersion, VariantRuntime
from radflow.db.audit import record
from radflow.db.registry import ModelStatus
from radflow.errors import NoChampion, RadflowError

logger = logging.getLogger(__name__)

SERVE = "serve"
SERVE_ROLLBACK = "serve-rollback"
"""Audit actions: a runtime chosen for a version, and that choice undone."""


class VariantError(RadflowError):
    """A variant cannot do what was asked; ``reason`` is a stable code, the message the way out."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def variants_of(session: Session, version: ModelVersion) -> list[ModelVariant]:
    """The version's variants, in the order of VariantRuntime (PyTorch fp32 first)."""
    order = list(VariantRuntime)
    found = session.scalars(select(ModelVariant).where(ModelVariant.model_version_id == version.id))
    return sorted(found, key=lambda v: order.index(v.runtime))


def serving_variant(session: Session, version: ModelVersion) -> ModelVariant | None:
    """The variant chosen to score for ``version``; None: its PyTorch weights score."""
    return session.scalar(
        select(ModelVariant).where(
            ModelVariant.model_version_id == version.id, ModelVariant.serving.is_(True)
        )
    )


def serving_runtime(session: Session, version: ModelVersion) -> VariantRuntime:
    chosen = serving_variant(session, version)
    return chosen.runtime if chosen is not None else VariantRuntime.TORCH_FP32


def serve(
    session: Session, version: ModelVersion, runtime: VariantRuntime | str, *, actor: str
) -> VariantRuntime:
    """Make ``runtime`` the one that scores for ``version``; returns the one it replaces.

    ``torch-fp32`` always may (it is the version itself); any other runtime needs a variant
    that passed its non-inferiority check (``radflow model compress`` builds and judges them).
    PyTorch fp32 serves when no variant is marked serving.
    """
    wanted = _runtime(runtime)
    before = _switch(session, version, wanted)
    session.add(
        record(
            actor,
            SERVE,
            "model_version",
            version.name,
            task=version.task,
            runtime=wanted.value,
            previous=before.value,
        )
    )
    if version.status != ModelStatus.CHAMPION:
        logger.info("%s serves %s once it is the champion", version.name, wanted)
    logger.info("%s now serves %s (was %s)", version.name, wanted, before)
    return before


def _switch(session: Session, version: ModelVersion, runtime: VariantRuntime) -> VariantRuntime:
    """Mark ``runtime`` serving for ``version`` (if it may); returns what served before."""
    previous = serving_variant(session, version)
    chosen = _servable(session, version, runtime)
    if previous is not None:
        previous.serving = False
        session.flush()  # at most one serving variant, even within this transaction
    if chosen is not None:
        chosen.serving = True
    session.flush()
    return previous.runtime if previous is not None else VariantRuntime.TORCH_FP32


def _servable(
    session: Session, version: ModelVersion, runtime: VariantRuntime
) -> ModelVariant | None:
    """The variant row to mark serving (None: PyTorch fp32, which serves when none is marked)."""
    if runtime == VariantRuntime.TORCH_FP32:
        return None
    variant = next((v for v in variants_of(session, version) if v.runtime == runtime), None)
    if variant is None:
        raise VariantError(
            "no-variant",
            f"{version.name} has no {runtime} variant: build and judge it with "
            f"`radflow model compress {version.task} {version.version}`",
        )
    if not variant.passed:
        raise VariantError(
            "variant-refused",
            f"{version.name}'s {runtime} variant may not serve: {variant.reason}. Serve "
            "another runtime, or compress again (e.g. after more training images)",
        )
    return variant


def rollback_serving(session: Session, task: str, *, actor: str) -> VariantRuntime:
    """Serve again what the champion served before its runtime was last chosen; returns it."""
    champion = session.scalar(
        select(ModelVersion).where(
            ModelVersion.task == task, ModelVersion.status == ModelStatus.CHAMPION
        )
    )
    if champion is None:
        raise NoChampion(task)
    chosen = session.scalar(
        select(AuditEvent)
        .where(
            AuditEvent.action == SERVE,
            AuditEvent.object_type == "model_version",
            AuditEvent.object_id == champion.name,
        )
        .order_by(AuditEvent.id.desc())
        .limit(1)
    )
    current = serving_runtime(session, champion)
    if chosen is None or _runtime(chosen.details.get("previous", "")) == current:
        raise VariantError(
            "nothing-to-roll-back",
            f"{champion.name} serves {current}, and no earlier choice of runtime differs from "
            f"it; choose one with `radflow model serve {task} {champion.version} --runtime R`",
        )
    restored = _runtime(chosen.details["previous"])
    _switch(session, champion, restored)
    session.add(
        record(
            actor,
            SERVE_ROLLBACK,
            "model_version",
            champion.name,
            task=task,
            runtime=restored.value,
            previous=current.value,
        )
    )
    logger.info("%s serves %s again (was %s)", champion.name, restored, current)
    return restored


def _runtime(value: VariantRuntime | str) -> VariantRuntime:
    try:
        return VariantRuntime(value)
    except ValueError:
        known = ", ".join(r.value for r in VariantRuntime)
        raise VariantError(
            "unknown-runtime", f"unknown runtime {value!r}; runtimes are {known}"
        ) from None
