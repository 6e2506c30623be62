"""The audit trail: who did what to which object, and when."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from radflow.db.base import Base, utcnow


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
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(32), index=True)
    object_type: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[str] = mapped_column(String(128))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)


def record(
    actor: str, action: str, object_type: str, object_id: object, **details: Any
) -> AuditEvent:
    """Build an audit event; the caller adds it to its session so it commits with the action."""
    return AuditEvent(
        actor=actor,
        action=action,
        object_type=object_type,
        object_id=str(object_id),
        details=details,
    )
