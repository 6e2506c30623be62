"""Dashboard users, their login throttles and their server-side sessions."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from radflow.db.base import Base, utcnow


class User(Base):
    """A person who logs in to the dashboard; only an argon2 hash of the password is kept."""

    __tablename__ = "app_user"  # "user" is a reserved word in PostgreSQL

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(255))
    active: Mapped[bool] = mapped_column(default=True)
    must_change_password: Mapped[bool] = mapped_column(default=False)
    """Set by an admin's password reset: the next login must choose a new password."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LoginThrottle(Base):
    """Consecutive wrong passwords for one user name from one client address.

    One row per (user name, client), updated in place by a conditional UPDATE, so parallel
    attempts are counted atomically; the delay before the next attempt grows with ``failures``.
    Failures from one client never slow down the same user on another client, nor another user.
    """

    __tablename__ = "login_throttle"
    __table_args__ = (UniqueConstraint("username", "client", name="uq_login_throttle_user_client"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), index=True)
    client: Mapped[str] = mapped_column(String(64))
    failures: Mapped[int] = mapped_column(default=0)
    last_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    blocked_until: Mapped[datetime] = mapped_column(default=utcnow)


class DashboardSession(Base):
    """A logged-in browser: the browser holds a signed cookie naming it, the server its state.

    Only a SHA-256 of the random token is stored, so a copy of the database opens no session.
    Logout, idle expiry, deactivation and password resets end it here, which ends it everywhere.
    """

    __tablename__ = "dashboard_session"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_name: Mapped[str] = mapped_column(String(64), index=True)
    client: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None]
    end_reason: Mapped[str | None] = mapped_column(String(32))
