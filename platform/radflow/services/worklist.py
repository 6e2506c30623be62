"""The worklist: studies with their latest score, sorted and paginated in the database."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

from sqlalchemy import (
    ColumnElement,
    Row,
    Select,
    Subquery,
    UnaryExpression,
    and_,
    exists,
    func,
    select,
)
from sqlalchemy.orm import QueryableAttribute, Session, aliased

from radflow.db import ModelVersion, Patient, Prediction, Study, StudyStatus

WorklistSort = Literal["score", "received"]
SORTS: tuple[WorklistSort, ...] = get_args(WorklistSort)
MAX_LIMIT = 500


@dataclass(frozen=True)
class WorklistRow:
    """One study as the worklist shows it; score fields are None until a model has scored it."""

    study_uid: str
    accession: str | None
    patient: str
    modality: str | None
    status: str
    status_reason: str | None
    received_at: datetime
    score: float | None
    threshold: float | None
    model: str | None
    flagged: bool


def list_studies(
    session: Session,
    *,
    sort: WorklistSort = "score",
    descending: bool = True,
    status: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[WorklistRow], int]:
    """One page of the worklist and the number of studies matching ``status`` (all if None).

    The score is the study's latest prediction (highest prediction id). Studies without one sort
    last in either direction, so unscored work never hides the most urgent scored studies.
    """
    _check_page(sort, limit, offset)
    where = _status_filter(status)
    order = _order(sort, descending)
    total = session.scalar(select(func.count()).select_from(Study).where(*where)) or 0
    page = _page(where, sort, order, limit, offset)
    stmt = _rows_query(page).order_by(*order)
    return [_row(r) for r in session.execute(stmt)], total


def status_counts(session: Session) -> dict[str, int]:
    """Studies per status, every status present (zero when none), in workflow order."""
    rows = session.execute(select(Study.status, func.count()).group_by(Study.status))
    counts: dict[StudyStatus, int] = {StudyStatus(status): n for status, n in rows}
    return {s.value: counts.get(s, 0) for s in StudyStatus}


def _check_page(sort: str, limit: int, offset: int) -> None:
    if sort not in SORTS:
        raise ValueError(f"sort={sort!r} is not one of {', '.join(SORTS)}")
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit={limit} must be between 1 and {MAX_LIMIT}")
    if offset < 0:
        raise ValueError(f"offset={offset} must be 0 or more")


def _status_filter(status: str | None) -> list[ColumnElement[bool]]:
    if status is None:
        return []
    try:
        return [Study.status == StudyStatus(status)]
    except ValueError:
        valid = ", ".join(s.value for s in StudyStatus)
        raise ValueError(f"status={status!r} is not a study status; use one of {valid}") from None


def _latest_prediction() -> ColumnElement[bool]:
    """Join condition for a study's latest prediction: the one no newer prediction follows.

    Same result as max(prediction.id) grouped per study, but one anti-join: PostgreSQL runs it in
    about half the time at 100,000 studies, and it yields the score without a second join.
    """
    newer = aliased(Prediction)
    return and_(
        Prediction.study_id == Study.id,
        ~exists().where(newer.study_id == Prediction.study_id, newer.id > Prediction.id),
    )


def _page(
    where: list[ColumnElement[bool]],
    sort: WorklistSort,
    order: list[UnaryExpression[Any]],
    limit: int,
    offset: int,
) -> Subquery:
    # Sort and cut the page on narrow rows (study id, plus the score if sorting by it), then join
    # the wide columns for the page's rows only. Sorting by date never reads the predictions.
    ids = select(Study.id).where(*where)
    if sort == "score":
        ids = ids.outerjoin(Prediction, _latest_prediction())
    return ids.order_by(*order).limit(limit).offset(offset).subquery("page")


def _rows_query(page: Subquery) -> Select[*tuple[Any, ...]]:
    return (
        select(
            Study.study_uid,
            Study.accession_number,
            Patient.pseudonym,
            Study.modality,
            Study.status,
            Study.status_reason,
            Study.received_at,
            Prediction.score,
            ModelVersion.threshold,
            ModelVersion.task,
            ModelVersion.version,
        )
        .select_from(page)
        .join(Study, Study.id == page.c.id)
        .join(Patient, Patient.id == Study.patient_id)
        .outerjoin(Prediction, _latest_prediction())
        .outerjoin(ModelVersion, ModelVersion.id == Prediction.model_version_id)
    )


def _order(sort: WorklistSort, descending: bool) -> list[UnaryExpression[Any]]:
    # Study.id breaks ties so pages never overlap or skip rows between requests.
    tail = [_direction(Study.received_at, descending), _direction(Study.id, descending)]
    if sort == "received":
        return tail
    return [_direction(Prediction.score, descending).nulls_last(), *tail]


def _direction(column: QueryableAttribute[Any], descending: bool) -> UnaryExpression[Any]:
    return column.desc() if descending else column.asc()


def _row(r: Row[*tuple[Any, ...]]) -> WorklistRow:
    score: float | None = r.score
    threshold: float | None = r.threshold
    return WorklistRow(
        study_uid=r.study_uid,
        accession=r.accession_number,
        patient=r.pseudonym,
        modality=r.modality,
        status=StudyStatus(r.status).value,
        status_reason=r.status_reason,
        received_at=r.received_at,
        score=score,
        threshold=threshold,
        model=f"{r.task}:v{r.version}" if r.task is not None else None,
        flagged=score is not None and threshold is not None and score >= threshold,
    )
