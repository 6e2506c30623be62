"""The pipeline page: ingest rate, queue sizes, rejected inputs and results on their way to PACS
(flow runs: flows.launcher)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from radflow.db import Delivery, DeliveryStatus, Instance, Rejection, ResultObject, Study
from radflow.db.audit import record
from radflow.db.base import utcnow
from radflow.delivery.outbox import resend
from radflow.services.users import Permission, Principal, require

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RejectionRow:
    at: datetime
    source: str
    reason: str
    message: str | None
    """None (with origin and quarantine_key) for whoever may not see input details."""
    origin: str | None
    quarantine_key: str | None


def ingest_rate(
    session: Session, principal: Principal, *, hours: int = 24, now: datetime | None = None
) -> list[tuple[datetime, int]]:
    """Instances received per hour over the last ``hours`` hours, oldest first, zeros included."""
    require(principal, Permission.VIEW_PIPELINE)
    now = (now or utcnow()).replace(minute=0, second=0, microsecond=0)
    start = now - timedelta(hours=hours - 1)
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        hour: Any = func.date_trunc("hour", Instance.received_at)
    else:  # SQLite stores UTC text; cut it at the hour
        hour = func.strftime("%Y-%m-%d %H:00:00", Instance.received_at)
    counts = session.execute(
        select(hour, func.count()).where(Instance.received_at >= start).group_by(hour)
    ).all()
    by_hour = {_as_hour(h): n for h, n in counts}
    return [
        (start + timedelta(hours=i), by_hour.get(start + timedelta(hours=i), 0))
        for i in range(hours)
    ]


def _as_hour(value: datetime | str) -> datetime:
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=utcnow().tzinfo)
    return moment.astimezone(utcnow().tzinfo).replace(minute=0, second=0, microsecond=0)


def rejections(
    session: Session, principal: Principal, *, limit: int = 100
) -> tuple[list[RejectionRow], dict[str, int]]:
    """The newest rejected inputs, and the count of all rejections per reason.

    File names, calling AE titles and messages can hold patient names and record numbers (a
    file named after the patient, a value quoted in the reason): only a principal with
    VIEW_INPUT_DETAILS (admins) sees them; others get the time, source and reason code.
    """
    require(principal, Permission.VIEW_PIPELINE)
    details = principal.can(Permission.VIEW_INPUT_DETAILS)
    rows = session.scalars(
        select(Rejection).order_by(Rejection.at.desc(), Rejection.id.desc()).limit(limit)
    ).all()
    counts = session.execute(
        select(Rejection.reason, func.count())
        .group_by(Rejection.reason)
        .order_by(func.count().desc())
    ).all()
    by_reason = {str(reason): int(n) for reason, n in counts}
    return [
        RejectionRow(r.at, r.source, r.reason, r.message, r.origin, r.quarantine_key)
        if details
        else RejectionRow(r.at, r.source, r.reason, None, None, None)
        for r in rows
    ], by_reason


@dataclass(frozen=True)
class ParkedResult:
    """A result that stopped trying to reach its destination, and why."""

    delivery_id: int
    study_uid: str
    kind: str
    destination: str
    attempts: int
    reason: str | None
    since: datetime


@dataclass(frozen=True)
class UnwrittenReport:
    """A prediction whose SR could not be made, and why."""

    study_uid: str
    reason: str
    at: datetime


@dataclass(frozen=True)
class ResultsOut:
    counts: dict[str, int]
    """Deliveries per status: pending, sent, parked."""
    parked: list[ParkedResult]
    unwritten: list[UnwrittenReport]


def results_out(session: Session, principal: Principal, *, limit: int = 100) -> ResultsOut:
    """Results (SR, SEG) on their way to PACS: counts, and the newest parked and unwritten."""
    require(principal, Permission.VIEW_PIPELINE)
    counts = dict.fromkeys((s.value for s in DeliveryStatus), 0)
    for status, n in session.execute(
        select(Delivery.status, func.count()).group_by(Delivery.status)
    ):
        counts[DeliveryStatus(status).value] = int(n)
    parked = session.execute(
        select(Delivery, Study.study_uid)
        .join(Study, Study.id == Delivery.study_id)
        .where(Delivery.status == DeliveryStatus.PARKED)
        .order_by(Delivery.updated_at.desc(), Delivery.id.desc())
        .limit(limit)
    )
    unwritten = session.execute(
        select(ResultObject.error, ResultObject.created_at, Study.study_uid)
        .join(Study, Study.id == ResultObject.study_id)
        .where(ResultObject.error.is_not(None))
        .order_by(ResultObject.created_at.desc(), ResultObject.id.desc())
        .limit(limit)
    )
    return ResultsOut(
        counts=counts,
        parked=[
            ParkedResult(
                d.id,
                uid,
                d.kind.value.upper(),
                d.destination,
                d.attempts,
                d.last_error,
                d.updated_at,
            )
            for d, uid in parked
        ],
        unwritten=[UnwrittenReport(uid, str(error), at) for error, at, uid in unwritten],
    )


def resend_results(session: Session, principal: Principal, delivery_ids: Sequence[int]) -> int:
    """Send parked results again (the cause fixed); audited. How many were parked."""
    require(principal, Permission.RESEND_RESULTS)
    count = resend(session, delivery_ids)
    session.add(
        record(
            principal.name,
            "resend",
            "delivery",
            ",".join(map(str, delivery_ids))[:128],
            count=count,
        )
    )
    return count
