"""Triage priority, kept on the study row: flagged by its latest model score first.

Whoever inserts a prediction (the process flow, a re-score after promotion, a test factory),
``Study.latest_prediction_id`` and ``Study.triage_rank`` follow it in the same transaction. The
worklist then orders and pages on the ``ix_study_triage`` index alone.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, or_, select, update
from sqlalchemy.orm import Mapper

from radflow.db.imaging import Study
from radflow.db.registry import ModelVersion
from radflow.db.results import Prediction

FLAGGED, BELOW_THRESHOLD, UNSCORED = 0, 1, 2
"""Values of Study.triage_rank: lower is more urgent."""


def rank(score: float | None, threshold: float | None) -> int:
    """The triage rank of a score against its model's operating threshold (inclusive)."""
    if score is None or threshold is None:
        return UNSCORED
    return FLAGGED if score >= threshold else BELOW_THRESHOLD


def _after_prediction_insert(_mapper: Mapper[Any], connection: Connection, target: Any) -> None:
    prediction: Prediction = target
    threshold = connection.scalar(
        select(ModelVersion.threshold).where(ModelVersion.id == prediction.model_version_id)
    )
    # Only a newer prediction moves the pointer: the "latest" is the highest prediction id.
    connection.execute(
        update(Study)
        .where(
            Study.id == prediction.study_id,
            or_(
                Study.latest_prediction_id.is_(None),
                Study.latest_prediction_id < prediction.id,
            ),
        )
        .values(
            latest_prediction_id=prediction.id,
            triage_rank=rank(prediction.score, threshold),
        )
    )


def install() -> None:
    """Attach the hook to the Prediction mapper (idempotent; done when radflow.db is imported)."""
    from sqlalchemy import event

    if not event.contains(Prediction, "after_insert", _after_prediction_insert):
        event.listen(Prediction, "after_insert", _after_prediction_insert)


install()
