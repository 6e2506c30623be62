"""The audit trail: what the admin page shows, what pages record, and its verification.

``verify_chain`` re-computes the hash chain (radflow.db.audit) from the first event to the last
and compares the end with the chain's head: an edited, deleted or inserted event, or events cut
off the end, show as a break at that position (``radflow audit verify``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from radflow.db import AuditEvent
from radflow.db.audit import GENESIS_HASH, AuditChainHead, hash_of, record
from radflow.services.users import Permission, PermissionDenied, Principal, require

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


def note(
    session: Session,
    principal: Principal,
    action: str,
    object_type: str,
    object_id: object,
    **details: Any,
) -> None:
    """Record something ``principal`` did or was refused (joins the caller's transaction)."""
    session.add(record(principal.name, action, object_type, object_id, **details))


def note_denied(session: Session, denied: PermissionDenied, where: str) -> None:
    """Record a refused action (in a transaction of its own: the refused one rolled back)."""
    note(session, denied.principal, "permission-denied", where, denied.permission.value)


@dataclass(frozen=True)
class ChainReport:
    events: int
    head_seq: int
    head_hash: str
    problems: list[str]
    """Empty when every event links to the one before it and the last one to the head."""

    @property
    def intact(self) -> bool:
        return not self.problems


def verify_chain(session: Session, *, max_problems: int = 20) -> ChainReport:
    """Walk the whole audit chain in order and report every place it does not hold."""
    problems: list[str] = []
    expected_seq, prev = 1, GENESIS_HASH
    count = 0
    events = session.scalars(
        select(AuditEvent).order_by(AuditEvent.seq).execution_options(yield_per=1000)
    )
    for event in events:
        count += 1
        if event.seq != expected_seq:
            problems.append(
                f"events {expected_seq}..{event.seq - 1} are missing (deleted?) "
                f"before id {event.id}"
            )
        elif event.prev_hash != prev:
            problems.append(f"event {event.seq} (id {event.id}) does not link to the one before")
        if hash_of(event) != event.hash:
            problems.append(f"event {event.seq} (id {event.id}) was changed after it was written")
        expected_seq, prev = event.seq + 1, event.hash
        if len(problems) >= max_problems:
            problems.append("(stopped after this many problems)")
            break
    head = session.get(AuditChainHead, 1)
    head_seq, head_hash = (head.seq, head.last_hash) if head else (0, GENESIS_HASH)
    if len(problems) < max_problems and (head_seq != expected_seq - 1 or head_hash != prev):
        problems.append(
            f"the chain ends at event {expected_seq - 1} but its head says {head_seq}: "
            "events were cut off the end, or the head was changed"
        )
    return ChainReport(count, head_seq, head_hash, problems)
