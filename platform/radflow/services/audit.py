"""The audit trail as the admin page shows it: who viewed, labelled, trained and promoted what."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from radflow.db import AuditEvent
from radflow.services.users import Permission, Principal, require

MAX_LIMIT = 1000


@dataclass(frozen=True)
class AuditFilter:
    actor: str | None = None
    action: str | None = None
    object_id: str | None = None
    """Exact object id, e.g. a Study Instance UID or "pneumonia-cxr:v2"."""
    since: datetime | None = None
    until: datetime | None = None
    """Exclusive."""


@dataclass(frozen=True)
class AuditRow:
    at: datetime
    actor: str
    action: str
    object_type: str
    object_id: str
    details: dict[str, Any]


def list_events(
    session: Session,
    principal: Principal,
    where: AuditFilter | None = None,
    *,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[AuditRow], int]:
    """One page of audit events, newest first, and how many match."""
    require(principal, Permission.VIEW_AUDIT)
    if not 1 <= limit <= MAX_LIMIT or offset < 0:
        raise ValueError(f"limit must be 1..{MAX_LIMIT} and offset 0 or more")
    conditions = _conditions(where or AuditFilter())
    total = session.scalar(select(func.count(AuditEvent.id)).where(*conditions)) or 0
    events = session.scalars(
        select(AuditEvent)
        .where(*conditions)
        .order_by(AuditEvent.at.desc(), AuditEvent.id.desc())
        .limit(limit)
        .offset(offset)
    )
    rows = [
        AuditRow(e.at, e.actor, e.action, e.object_type, e.object_id, dict(e.details or {}))
        for e in events
    ]
    return rows, total


def choices(session: Session, principal: Principal) -> tuple[list[str], list[str]]:
    """The actors and actions that occur, for the filter boxes."""
    require(principal, Permission.VIEW_AUDIT)
    actors = sorted(session.scalars(select(AuditEvent.actor).distinct()))
    actions = sorted(session.scalars(select(AuditEvent.action).distinct()))
    return actors, actions


def _conditions(f: AuditFilter) -> list[ColumnElement[bool]]:
    out: list[ColumnElement[bool]] = []
    if f.actor:
        out.append(AuditEvent.actor == f.actor)
    if f.action:
        out.append(AuditEvent.action == f.action)
    if f.object_id:
        out.append(AuditEvent.object_id == f.object_id.strip())
    if f.since is not None:
        out.append(AuditEvent.at >= f.since)
    if f.until is not None:
        out.append(AuditEvent.at < f.until)
    return out
