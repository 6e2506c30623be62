"""Dashboard sessions: a signed cookie in the browser, bound to a row on the server.

The browser holds ``<token>.<signature>`` in an HttpOnly, SameSite=Strict cookie; the database
holds only the SHA-256 of the token. A session lives while it is used: each page run moves
``last_seen_at`` on, and a session idle for ``session_idle_minutes`` ends, as does one whose user
logs out, is deactivated or has their password reset. An ended session never comes back, so a
copied cookie is worth nothing after any of these.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from radflow.db import DashboardSession
from radflow.db.audit import record
from radflow.db.base import utcnow
from radflow.services.users import Principal, get_principal
from radflow.settings import Settings

COOKIE = "radflow_session"
TOUCH_EVERY = timedelta(seconds=15)
"""last_seen_at is written at most this often (or a tenth of the idle timeout, if shorter): one
page run after another need not all write."""


@dataclass(frozen=True)
class LiveSession:
    id: int
    principal: Principal
    last_seen_at: datetime


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def sign(token: str, key: bytes) -> str:
    return f"{token}.{hmac.new(key, token.encode(), hashlib.sha256).hexdigest()}"


def unsign(cookie: str | None, key: bytes) -> str | None:
    """The token of a cookie value signed with ``key``; None if absent, malformed or forged."""
    if not cookie or cookie.count(".") != 1:
        return None
    token, signature = cookie.split(".")
    expected = hmac.new(key, token.encode(), hashlib.sha256).hexdigest()
    return token if hmac.compare_digest(signature, expected) else None


def start_session(session: Session, principal: Principal, client: str) -> str:
    """A new session for a user who just logged in; returns its token (for the cookie)."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    session.add(
        DashboardSession(
            token_hash=_hash(token),
            user_name=principal.name,
            client=client[:64],
            created_at=now,
            last_seen_at=now,
        )
    )
    return token


def resume(
    session: Session,
    settings: Settings,
    token: str | None,
    *,
    touch: bool = True,
    now: datetime | None = None,
) -> LiveSession | None:
    """The live session of ``token``, or None; ends it here if it has been idle too long.

    ``touch`` counts this as activity (a page run); an image fetch or the page's idle check
    does not. The caller commits (an ending is audited).
    """
    if not token:
        return None
    now = now or utcnow()
    row = _row(session, token)
    if row is None or row.ended_at is not None:
        return None
    # SQLite hands datetimes back without a zone; they were written in UTC.
    seen = row.last_seen_at
    seen = seen if seen.tzinfo else seen.replace(tzinfo=now.tzinfo)
    idle = timedelta(minutes=settings.session_idle_minutes)
    if now - seen > idle:
        _end(session, row, "idle", now)
        return None
    principal = get_principal(session, row.user_name)
    if principal is None:
        _end(session, row, "deactivated", now)
        return None
    if touch and now - seen >= min(TOUCH_EVERY, idle / 10):
        row.last_seen_at = seen = now
    return LiveSession(row.id, principal, seen)


def end_session(session: Session, token: str | None, reason: str) -> None:
    """End the session of ``token`` (logout); nothing if it already ended."""
    if not token:
        return
    row = _row(session, token)
    if row is not None and row.ended_at is None:
        _end(session, row, reason, utcnow())


def end_idle_sessions(session: Session, settings: Settings, *, now: datetime | None = None) -> int:
    """End (and audit) every session idle past the timeout; returns how many.

    A tab closed without logging out never comes back to be ended by ``resume``: this records
    its end anyway. The login page calls it at each login, so an abandoned session is in the
    audit trail by the next time anyone logs in.
    """
    now = now or utcnow()
    cutoff = now - timedelta(minutes=settings.session_idle_minutes)
    rows = session.scalars(
        select(DashboardSession)
        .where(DashboardSession.ended_at.is_(None), DashboardSession.last_seen_at < cutoff)
        .order_by(DashboardSession.id)
    ).all()
    for row in rows:
        _end(session, row, "idle", now)
    return len(rows)


def ended_reason(session: Session, token: str) -> str | None:
    """Why the session of ``token`` ended (logout, idle, ...); None if it did not or is unknown."""
    row = _row(session, token)
    return row.end_reason if row is not None and row.ended_at is not None else None


def _row(session: Session, token: str) -> DashboardSession | None:
    return session.scalar(
        select(DashboardSession).where(DashboardSession.token_hash == _hash(token))
    )


def _end(session: Session, row: DashboardSession, reason: str, now: datetime) -> None:
    row.ended_at, row.end_reason = now, reason
    session.add(record(row.user_name, "session-end", "session", row.id, reason=reason))
