"""What the platform concluded and what radiologists said: predictions and labels."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, String, UniqueConstraint, false, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from radflow.db.base import Base, utcnow, value_enum
from radflow.db.imaging import Study, StudyStatus
from radflow.db.registry import ModelVersion, VariantRuntime


class Prediction(Base):
    """One model version's output for one study; re-scoring adds a row, history is kept.

    A late instance reopens a scored study; its predictions are then ``superseded`` (made on an
    incomplete study) and the study is scored again. At most one current (not superseded)
    prediction per study and model version: a partial unique index, on SQLite and PostgreSQL.
    """

    __tablename__ = "prediction"
    __table_args__ = (
        Index(
            "uq_prediction_current",
            "study_id",
            "model_version_id",
            unique=True,
            sqlite_where=text("NOT superseded"),
            postgresql_where=text("NOT superseded"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_version.id"), index=True)
    task: Mapped[str] = mapped_column(String(64), index=True)
    score: Mapped[float] = mapped_column(index=True)
    scores: Mapped[dict[str, Any]] = mapped_column(default=dict)
    derived_keys: Mapped[dict[str, Any]] = mapped_column(default=dict)
    latency_ms: Mapped[float]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    superseded: Mapped[bool] = mapped_column(default=False, server_default=false())
    # Which variant of the model version computed the score (radflow.db.registry.ModelVariant).
    runtime: Mapped[VariantRuntime] = mapped_column(
        value_enum(VariantRuntime),
        default=VariantRuntime.TORCH_FP32,
        server_default=VariantRuntime.TORCH_FP32.value,
    )

    study: Mapped[Study] = relationship()
    model_version: Mapped[ModelVersion] = relationship()


class Label(Base):
    """Ground truth for a study and task, from an import, a review or a report."""

    __tablename__ = "label"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    task: Mapped[str] = mapped_column(String(64), index=True)
    value: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(32))
    author: Mapped[str] = mapped_column(String(64))
    split: Mapped[str | None] = mapped_column(String(16))
    comment: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    study: Mapped[Study] = relationship()


class TaskOutcome(Base):
    """Why a task gave a study no prediction: it does not apply (``no_model``, e.g. a chest task
    on a CT, or a CT series that is not one volume) or its input failed (``failed``).

    One row per study and task, so that with several tasks each one routes a study once: the
    study's own status is what all tasks together say (scored by any of them: SCORED), and
    this row keeps each task's reason. Deleted when the study is reopened by a late instance
    (radflow.ingest.stability.promote), so the complete study is routed again.
    """

    __tablename__ = "task_outcome"
    # Also the index of the lookups by study (pending studies, reopening, the study page).
    __table_args__ = (UniqueConstraint("study_id", "task"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"))
    task: Mapped[str] = mapped_column(String(64))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_version.id"))
    status: Mapped[StudyStatus] = mapped_column(value_enum(StudyStatus))
    reason: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
