"""How model versions were judged: each task's fixed evaluation set and every comparison made."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from radflow.db.base import Base, utcnow
from radflow.db.registry import ModelVersion


class EvaluationSet(Base):
    """The studies every version of a task is compared on; frozen when first made."""

    __tablename__ = "evaluation_set"

    id: Mapped[int] = mapped_column(primary_key=True)
    task: Mapped[str] = mapped_column(String(64), unique=True)
    policy: Mapped[str] = mapped_column(String(64))  # how the studies were chosen
    study_ids: Mapped[list[int]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelEvaluation(Base):
    """One version measured on the evaluation set, against the champion of the time."""

    __tablename__ = "model_evaluation"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_version.id"), index=True)
    champion_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_version.id"))
    task: Mapped[str] = mapped_column(String(64), index=True)
    n_studies: Mapped[int]
    auc: Mapped[float]
    champion_auc: Mapped[float | None]
    p_value: Mapped[float | None]
    alpha: Mapped[float]
    promoted: Mapped[bool]
    reason: Mapped[str] = mapped_column(String(512))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    model_version: Mapped[ModelVersion] = relationship(foreign_keys=[model_version_id])
