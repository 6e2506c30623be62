"""The worklist: studies in triage order with their latest score, filtered and paged in SQL.

Triage order: studies whose latest score reaches the model's operating threshold first, then
those below it, then unscored ones; within each, the longest-waiting first. The rank and the
pointer to the latest prediction live on the study row (``radflow.db.triage``), so the default
order is one index scan however many studies there are.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

from sqlalchemy import ColumnElement, Row, Select, UnaryExpression, exists, func, or_, select
from sqlalchemy.orm import QueryableAttribute, Session

from radflow.db import Label, ModelVersion, Patient, Prediction, Study, StudyStatus

WorklistSort = Literal["priority", "score", "received"]
SORTS: tuple[WorklistSort, ...] = get_args(WorklistSort)
MAX_LIMIT = 500
REVIEW_SOURCE = "review"
"""Label.source of a radiologist's review in the dashboard."""


@dataclass(frozen=True)
class WorklistFilter:
    """What the worklist narrows to; every field None (or empty) means no restriction."""

    status: str | None = None
    task: str | None = None
    modality: str | None = None
    received_from: datetime | None = None
    received_until: datetime | None = None
    """Exclusive upper bound."""
    reviewed: bool | None = None
    model_version_id: int | None = None
    search: str | None = None
    """Accession number or patient pseudonym, exact or as a prefix."""


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
    sort: WorklistSort = "priority",
    descending: bool = True,
    status: str | None = None,
    where: WorklistFilter | None = None,
    limit: int = 50,
    offset: int = 0,
    count: bool = True,
) -> tuple[list[WorklistRow], int]:
    """One page of the worklist and the number of matching studies (-1 if ``count`` is False).

    ``descending`` means "most urgent / highest / newest first" for every sort. ``status`` is a
    shortcut for ``where=WorklistFilter(status=...)``. Unscored studies sort last either way,
    except that ascending triage ("least urgent first") reverses the whole order.
    """
    _check_page(sort, limit, offset)
    where = where or WorklistFilter(status=status)
    if status is not None and where.status is None:
        where = WorklistFilter(**{**where.__dict__, "status": status})
    conditions, needs_prediction = _conditions(where)
    needs_prediction = needs_prediction or sort == "score"
    ids = _filtered(select(Study.id), conditions, needs_prediction)
    total = -1
    if count:
        total = session.scalar(
            _filtered(select(func.count(Study.id)), conditions, needs_prediction)
        )
        total = total or 0
    page = ids.order_by(*_order(sort, descending)).limit(limit).offset(offset).subquery("page")
    stmt = _rows_query(page).order_by(*_order(sort, descending))
    return [_row(r) for r in session.execute(stmt)], total


def count_studies(session: Session, where: WorklistFilter | None = None) -> int:
    """How many studies match ``where`` (the worklist's page count needs it first)."""
    conditions, needs_prediction = _conditions(where or WorklistFilter())
    stmt = _filtered(select(func.count(Study.id)), conditions, needs_prediction)
    return session.scalar(stmt) or 0


def status_counts(session: Session) -> dict[str, int]:
    """Studies per status, every status present (zero when none), in workflow order."""
    rows = session.execute(select(Study.status, func.count()).group_by(Study.status))
    counts: dict[StudyStatus, int] = {StudyStatus(status): n for status, n in rows}
    return {s.value: counts.get(s, 0) for s in StudyStatus}


@dataclass(frozen=True)
class FilterChoices:
    """The values the worklist's filter boxes offer: only what exists in the database."""

    tasks: list[str]
    modalities: list[str]
    models: dict[int, str]
    """Model version id -> "task:vN"."""


def filter_choices(session: Session) -> FilterChoices:
    versions = session.execute(
        select(ModelVersion.id, ModelVersion.task, ModelVersion.version).order_by(
            ModelVersion.task, ModelVersion.version.desc()
        )
    ).all()
    modalities = session.scalars(
        select(Study.modality).where(Study.modality.is_not(None)).distinct()
    )
    return FilterChoices(
        tasks=sorted({task for _, task, _ in versions}),
        modalities=sorted(m for m in modalities if m),
        models={id_: f"{task}:v{version}" for id_, task, version in versions},
    )


def _check_page(sort: str, limit: int, offset: int) -> None:
    if sort not in SORTS:
        raise ValueError(f"sort={sort!r} is not one of {', '.join(SORTS)}")
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit={limit} must be between 1 and {MAX_LIMIT}")
    if offset < 0:
        raise ValueError(f"offset={offset} must be 0 or more")


def _conditions(f: WorklistFilter) -> tuple[list[ColumnElement[bool]], bool]:
    """SQL conditions for the filter, and whether they need the latest prediction joined."""
    out: list[ColumnElement[bool]] = []
    if f.status is not None:
        out.append(Study.status == _status(f.status))
    if f.modality:
        out.append(Study.modality == f.modality)
    if f.received_from is not None:
        out.append(Study.received_at >= f.received_from)
    if f.received_until is not None:
        out.append(Study.received_at < f.received_until)
    if f.reviewed is not None:
        reviewed = exists().where(Label.study_id == Study.id, Label.source == REVIEW_SOURCE)
        out.append(reviewed if f.reviewed else ~reviewed)
    if f.search and f.search.strip():
        term = f.search.strip()
        pattern = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        patients = select(Patient.id).where(Patient.pseudonym.like(pattern, escape="\\"))
        out.append(
            or_(
                Study.accession_number.like(pattern, escape="\\"),
                Study.patient_id.in_(patients),
            )
        )
    prediction: list[ColumnElement[bool]] = []
    if f.task:
        prediction.append(Prediction.task == f.task)
    if f.model_version_id is not None:
        prediction.append(Prediction.model_version_id == f.model_version_id)
    return out + prediction, bool(prediction)


def _status(value: str) -> StudyStatus:
    try:
        return StudyStatus(value)
    except ValueError:
        valid = ", ".join(s.value for s in StudyStatus)
        raise ValueError(f"status={value!r} is not a study status; use one of {valid}") from None


def _filtered(
    stmt: Select[Any], conditions: list[ColumnElement[bool]], needs_prediction: bool
) -> Select[Any]:
    stmt = stmt.select_from(Study)
    if needs_prediction:
        stmt = stmt.outerjoin(Prediction, Prediction.id == Study.latest_prediction_id)
    return stmt.where(*conditions)


def _rows_query(page: Any) -> Select[Any]:
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
        .outerjoin(Prediction, Prediction.id == Study.latest_prediction_id)
        .outerjoin(ModelVersion, ModelVersion.id == Prediction.model_version_id)
    )


def _order(sort: WorklistSort, descending: bool) -> list[UnaryExpression[Any]]:
    # Study.id breaks ties so pages never overlap or skip rows between requests.
    if sort == "priority":
        # Most urgent = lowest rank, then the longest waiting: the ix_study_triage order.
        return [
            _direction(Study.triage_rank, not descending),
            _direction(Study.received_at, not descending),
            _direction(Study.id, not descending),
        ]
    tail = [_direction(Study.received_at, descending), _direction(Study.id, descending)]
    if sort == "received":
        return tail
    return [_direction(Prediction.score, descending).nulls_last(), *tail]


def _direction(column: QueryableAttribute[Any], descending: bool) -> UnaryExpression[Any]:
    return column.desc() if descending else column.asc()


def _row(r: Row[Any]) -> WorklistRow:
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
