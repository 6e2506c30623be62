"""Trained models: versions in the registry and the runs that produced them."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, String, UniqueConstraint, false, select
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship

from radflow.db.base import Base, utcnow, value_enum


class ModelStatus(enum.StrEnum):
    CHAMPION = "champion"
    CHALLENGER = "challenger"
    RETIRED = "retired"


class VariantRuntime(enum.StrEnum):
    """How a model version's network runs: its weights in PyTorch, or an ONNX Runtime file."""

    TORCH_FP32 = "torch-fp32"
    ONNX_FP32 = "onnx-fp32"
    ONNX_INT8 = "onnx-int8"


class TrainingRun(Base):
    __tablename__ = "training_run"

    id: Mapped[int] = mapped_column(primary_key=True)
    task: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), default="running")
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    label_ids: Mapped[list[str]] = mapped_column(default=list)
    history: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(String(1024))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class ModelVersion(Base):
    __tablename__ = "model_version"
    __table_args__ = (UniqueConstraint("task", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    task: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int]
    status: Mapped[ModelStatus] = mapped_column(
        value_enum(ModelStatus),
        default=ModelStatus.CHALLENGER,
    )
    weights_key: Mapped[str] = mapped_column(String(255))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    threshold: Mapped[float] = mapped_column(default=0.5)
    training_run_id: Mapped[int | None] = mapped_column(ForeignKey("training_run.id"))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_version.id"))
    code_version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    @property
    def name(self) -> str:
        return f"{self.task}:v{self.version}"


class ModelVariant(Base):
    """One way of running a model version, judged on the task's evaluation set like a version.

    ``torch-fp32`` is the version's own weights (the reference every other variant is compared
    with, paired, on the same studies); the ONNX variants are files in the object store. Only
    a variant that ``passed`` may serve; at most one variant of a version is ``serving`` (none:
    PyTorch fp32 serves), and it scores while its version is the champion.
    """

    __tablename__ = "model_variant"
    __table_args__ = (UniqueConstraint("model_version_id", "runtime"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_version.id"), index=True)
    runtime: Mapped[VariantRuntime] = mapped_column(value_enum(VariantRuntime))
    object_key: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int]
    # Its metrics on the evaluation set, throughput, parity with PyTorch, the reference's metrics.
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    passed: Mapped[bool]
    reason: Mapped[str] = mapped_column(String(512))
    serving: Mapped[bool] = mapped_column(default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    model_version: Mapped[ModelVersion] = relationship()

    @property
    def name(self) -> str:
        return f"{self.model_version.name}@{self.runtime}"


def champion_tasks(session: Session) -> list[str]:
    """Names of the tasks that have a champion model, sorted.

    Here rather than in :mod:`radflow.learning.registry` because the receiver asks it on every
    tick: this module needs neither PyTorch nor MONAI, which would triple the receiver's memory.
    """
    query = select(ModelVersion.task).where(ModelVersion.status == ModelStatus.CHAMPION)
    return sorted(set(session.scalars(query)))
