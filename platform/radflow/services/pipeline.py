"""The pipeline page: ingest rate, queue sizes, rejected inputs and recent flow runs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from radflow.db import Instance, Rejection
from radflow.db.base import utcnow
from radflow.services.users import Permission, Principal, require

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RejectionRow:
    at: datetime
    source: str
    reason: str
    message: str
    origin: str | None
    quarantine_key: str | None


@dataclass(frozen=True)
class FlowRunRow:
    flow: str
    name: str
    state: str
    start_time: datetime | None
    end_time: datetime | None
    message: str | None


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
    """The newest rejected inputs, and the count of all rejections per reason."""
    require(principal, Permission.VIEW_PIPELINE)
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
        RejectionRow(r.at, r.source, r.reason, r.message, r.origin, r.quarantine_key) for r in rows
    ], by_reason


class FlowRunsUnavailable(Exception):
    """The Prefect API could not be asked; the message says why."""


def recent_flow_runs(
    principal: Principal, api_url: str | None, *, limit: int = 30
) -> list[FlowRunRow]:
    """The newest flow runs from the Prefect server at ``api_url``.

    Raises FlowRunsUnavailable when no server is configured (``api_url`` empty: flows then run
    in-process with a temporary server that keeps no history) or it does not answer.
    """
    require(principal, Permission.VIEW_PIPELINE)
    if not api_url:
        raise FlowRunsUnavailable(
            "no Prefect server configured (PREFECT_API_URL is unset): flows run in-process "
            "and keep no run history; start `prefect server start` and `radflow worker` to see runs"
        )
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=limit)
            flows = {f.id: f.name for f in client.read_flows(limit=200)}
    except (httpx.HTTPError, OSError, RuntimeError) as exc:
        raise FlowRunsUnavailable(f"the Prefect server at {api_url} did not answer: {exc}") from exc
    return [
        FlowRunRow(
            flow=flows.get(run.flow_id, str(run.flow_id)),
            name=run.name,
            state=run.state_name or "unknown",
            start_time=run.start_time,
            end_time=run.end_time,
            message=run.state.message if run.state is not None else None,
        )
        for run in runs
    ]
