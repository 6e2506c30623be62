"""The audit trail (who did what to which object, and when) and the rejected inputs.

The trail is tamper-evident: every event carries its position in one chain (``seq``), the hash
of the event before it and its own hash over both and its content, so editing, deleting or
inserting a row breaks the chain where it happened (``radflow audit verify``). The hashes are
filled in just before an event is written, whoever adds it (``record`` + ``session.add``), in
the same transaction; the one-row ``audit_chain_head`` is updated in that transaction too,
which serialises writers of audit events so two of them never extend the chain from the same
link. On both databases triggers refuse UPDATE and DELETE of events (migration
``security_hardening``).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import String, event, inspect, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from radflow.db.base import Base, utcnow

GENESIS_HASH = "0" * 64
"""The "previous hash" of the first event of the chain."""


class Rejection(Base):
    """An input Radflow refused (receiver, watch folder, ingest), with the reason: never silent."""

    __tablename__ = "rejection"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    source: Mapped[str] = mapped_column(String(16), index=True)  # receiver | folder | ingest
    reason: Mapped[str] = mapped_column(String(64), index=True)  # InvalidInstance.reason codes
    message: Mapped[str] = mapped_column(String(1024))
    origin: Mapped[str | None] = mapped_column(String(255))  # calling AE title or file name
    quarantine_key: Mapped[str | None] = mapped_column(String(255))


class AuditEvent(Base):
    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(primary_key=True)
    seq: Mapped[int] = mapped_column(unique=True)
    """Position in the chain: 1, 2, 3, ... without gaps."""
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(32), index=True)
    object_type: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[str] = mapped_column(String(128))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditChainHead(Base):
    """The chain's last position and hash (one row, id 1): where the next event links on.

    Also what ``radflow audit verify`` compares the last event with, so cutting events off the
    end of the table shows too.
    """

    __tablename__ = "audit_chain_head"

    id: Mapped[int] = mapped_column(primary_key=True)
    seq: Mapped[int]
    last_hash: Mapped[str] = mapped_column(String(64))


def record(
    actor: str, action: str, object_type: str, object_id: object, **details: Any
) -> AuditEvent:
    """Build an audit event; the caller adds it to its session so it commits with the action."""
    return AuditEvent(
        actor=actor[:64],
        action=action,
        object_type=object_type,
        object_id=str(object_id)[:128],
        # As the JSON column gives it back, so the hash is computed over what is stored.
        details=json.loads(json.dumps(details, default=str)),
    )


def event_hash(
    prev_hash: str,
    seq: int,
    at: datetime,
    actor: str,
    action: str,
    object_type: str,
    object_id: str,
    details: dict[str, Any],
) -> str:
    """SHA-256 over the previous hash and every field of the event, canonically encoded."""
    moment = (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC)
    payload = [prev_hash, seq, moment.isoformat(), actor, action, object_type, object_id, details]
    encoded = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(encoded.encode()).hexdigest()


def hash_of(e: AuditEvent) -> str:
    return event_hash(
        e.prev_hash, e.seq, e.at, e.actor, e.action, e.object_type, e.object_id, e.details or {}
    )


@event.listens_for(Session, "before_flush")
def _chain_new_events(session: Session, _context: object, _instances: object) -> None:
    new = [o for o in session.new if isinstance(o, AuditEvent)]
    if not new:
        return
    new.sort(key=lambda o: inspect(o).insert_order or 0)  # set on every pending object
    # The UPDATE locks the head row (PostgreSQL) or the database (SQLite) until this
    # transaction ends, so no other writer reads the same last link meanwhile.
    last_seq, prev = session.execute(
        update(AuditChainHead)
        .where(AuditChainHead.id == 1)
        .values(seq=AuditChainHead.seq + len(new))
        .returning(AuditChainHead.seq, AuditChainHead.last_hash)
    ).one()
    for seq, e in enumerate(new, start=last_seq - len(new) + 1):
        e.seq, e.prev_hash = seq, prev
        e.at = e.at or utcnow()
        e.details = e.details or {}
        e.hash = prev = hash_of(e)
    session.execute(update(AuditChainHead).where(AuditChainHead.id == 1).values(last_hash=prev))
