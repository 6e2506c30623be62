"""Triage priority, kept on the study row: flagged by its latest model score first.

Whoever inserts a prediction (the process flow, a re-score after promotion, a test factory),
``Study.latest_prediction_id`` and ``Study.triage_rank`` follow it in the same transaction. The
worklist then orders and pages on the ``ix_study_triage`` index alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from sqlalchemy import Connection, Integer, Table, bindparam, case, or_, select, update
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


class Move(NamedTuple):
    """A study's newly inserted prediction and the triage rank it gives."""

    study_id: int
    prediction_id: int
    rank: int


def advance(connection: Connection, moves: Sequence[Move], **values: Any) -> None:
    """Point each study at its new prediction, in one statement for all of them.

    Only a newer prediction moves the pointer (the "latest" is the highest prediction id), so
    an older one inserted late never hides a newer score. ``values`` are set on every study
    listed, moved or not (the scoring sets the status here in the same statement).
    """
    study: Table = Study.__table__  # type: ignore[assignment]  # mapped to a Table
    column = study.c
    newer = or_(
        column.latest_prediction_id.is_(None),
        column.latest_prediction_id < bindparam("b_prediction", type_=Integer),
    )
    connection.execute(
        update(study)
        .where(column.id == bindparam("b_study", type_=Integer))
        .values(
            **values,
            latest_prediction_id=case(
                (newer, bindparam("b_prediction", type_=Integer)),
                else_=column.latest_prediction_id,
            ),
            triage_rank=case((newer, bindparam("b_rank", type_=Integer)), else_=column.triage_rank),
        ),
        [{"b_study": m.study_id, "b_prediction": m.prediction_id, "b_rank": m.rank} for m in moves],
    )


def _after_prediction_insert(_mapper: Mapper[Any], connection: Connection, target: Any) -> None:
    prediction: Prediction = target
    threshold = connection.scalar(
        select(ModelVersion.threshold).where(ModelVersion.id == prediction.model_version_id)
    )
    move = Move(prediction.study_id, prediction.id, rank(prediction.score, threshold))
    advance(connection, [move])


def install() -> None:
    """Attach the hook to the Prediction mapper (idempotent; done when radflow.db is imported)."""
    from sqlalchemy import event

    if not event.contains(Prediction, "after_insert", _after_prediction_insert):
        event.listen(Prediction, "after_insert", _after_prediction_insert)


install()
