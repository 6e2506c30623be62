"""Dashboard users: roles, permissions, argon2 passwords and rate-limited login.

Every service function that performs an action takes the acting ``Principal`` and calls
``require(principal, permission)`` itself, so hiding a button is never the only protection.
"""

from __future__ import annotations

import enum
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from radflow.db import LoginAttempt, User
from radflow.db.audit import record
from radflow.db.base import utcnow
from radflow.errors import RadflowError
from radflow.settings import Settings

logger = logging.getLogger(__name__)

_HASHER = PasswordHasher()
# Verified when the user does not exist, so a wrong name costs as long as a wrong password and
# response times do not reveal which names are real.
_DUMMY_HASH = _HASHER.hash("radflow-no-such-user")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD_LENGTH = 8
CLIENT_FAILURE_FACTOR = 4
"""A client address may fail this many times more than one user: a shared reading room."""


class Role(enum.StrEnum):
    RADIOLOGIST = "radiologist"
    ML_ENGINEER = "ml-engineer"
    ADMIN = "admin"


class Permission(enum.StrEnum):
    VIEW_STUDIES = "view-studies"
    REVIEW = "review"
    VIEW_MODELS = "view-models"
    PROMOTE = "promote"
    RETRAIN = "retrain"
    VIEW_PIPELINE = "view-pipeline"
    RESEND_RESULTS = "resend-results"
    VIEW_AUDIT = "view-audit"


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.RADIOLOGIST: frozenset({Permission.VIEW_STUDIES, Permission.REVIEW}),
    Role.ML_ENGINEER: frozenset(
        {
            Permission.VIEW_STUDIES,
            Permission.VIEW_MODELS,
            Permission.PROMOTE,
            Permission.RETRAIN,
            Permission.VIEW_PIPELINE,
            Permission.RESEND_RESULTS,
        }
    ),
    Role.ADMIN: frozenset(Permission),
}


@dataclass(frozen=True)
class Principal:
    """Who is acting: a logged-in user (or a named system actor) and their role."""

    name: str
    role: Role

    def can(self, permission: Permission) -> bool:
        return permission in ROLE_PERMISSIONS[self.role]


class PermissionDenied(RadflowError, PermissionError):
    def __init__(self, principal: Principal, permission: Permission) -> None:
        super().__init__(
            f"{principal.name} ({principal.role}) may not {permission.value}; "
            "ask an admin for a role that allows it"
        )
        self.permission = permission


class LoginFailed(RadflowError):
    """Wrong name or password (deliberately not saying which)."""

    def __init__(self) -> None:
        super().__init__("wrong user name or password")


class TooManyAttempts(RadflowError):
    def __init__(self, retry_after: timedelta) -> None:
        minutes = max(1, round(retry_after.total_seconds() / 60))
        super().__init__(
            f"too many wrong passwords: try again in about {minutes} minute(s), "
            "or ask an admin to reset your password"
        )
        self.retry_after = retry_after


class UserExists(RadflowError):
    def __init__(self, name: str) -> None:
        super().__init__(f"user {name!r} already exists; choose another name")


def require(principal: Principal, permission: Permission) -> None:
    """Raise PermissionDenied unless ``principal``'s role grants ``permission``."""
    if not principal.can(permission):
        logger.warning("denied %s to %s (%s)", permission.value, principal.name, principal.role)
        raise PermissionDenied(principal, permission)


def parse_role(value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        roles = ", ".join(r.value for r in Role)
        raise ValueError(f"role {value!r} is not one of {roles}") from None


def add_user(session: Session, name: str, role: Role | str, password: str) -> User:
    """Create a user with an argon2 hash of ``password``."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"user name {name[:80]!r} must be 1-64 letters, digits, '.', '_', '@' or '-'"
        )
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"password must be at least {MIN_PASSWORD_LENGTH} characters long")
    role = parse_role(role) if isinstance(role, str) else role
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise UserExists(name)
    user = User(name=name, role=role.value, password_hash=_HASHER.hash(password))
    session.add(user)
    session.flush()
    session.add(record("radflow", "user-add", "user", name, role=role.value))
    return user


def get_principal(session: Session, name: str) -> Principal | None:
    """The active user ``name`` as a Principal, None if unknown or deactivated.

    The dashboard calls this on every page run, so a role change or deactivation takes effect
    at the user's next click, not at their next login.
    """
    user = session.scalar(select(User).where(User.name == name, User.active.is_(True)))
    return Principal(user.name, parse_role(user.role)) if user is not None else None


def authenticate(
    session: Session,
    settings: Settings,
    name: str,
    password: str,
    *,
    client: str = "unknown",
    now: datetime | None = None,
) -> Principal:
    """Check a password; every attempt is recorded and failures are rate-limited.

    Per user: ``login_max_failures`` within ``login_window_minutes``; per client address four
    times that. The caller commits the session so the attempt counts even when this raises.
    """
    now = now or utcnow()
    name, client = name.strip()[:64], (client or "unknown")[:64]
    _check_rate(session, settings, name, client, now)
    user = session.scalar(select(User).where(User.name == name, User.active.is_(True)))
    ok = _verify(user.password_hash if user else _DUMMY_HASH, password) and user is not None
    session.add(LoginAttempt(at=now, username=name, client=client, succeeded=ok))
    if not ok or user is None:
        session.add(record(name or "-", "login-failed", "user", name or "-", client=client))
        raise LoginFailed()
    if _HASHER.check_needs_rehash(user.password_hash):
        user.password_hash = _HASHER.hash(password)
    session.add(record(user.name, "login", "user", user.name, client=client))
    return Principal(user.name, parse_role(user.role))


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def _check_rate(
    session: Session, settings: Settings, name: str, client: str, now: datetime
) -> None:
    window = timedelta(minutes=settings.login_window_minutes)
    since = now - window
    limits = (
        (LoginAttempt.username == name, settings.login_max_failures),
        (LoginAttempt.client == client, settings.login_max_failures * CLIENT_FAILURE_FACTOR),
    )
    for who, limit in limits:
        failures, oldest = session.execute(
            select(func.count(), func.min(LoginAttempt.at)).where(
                who, LoginAttempt.at > since, LoginAttempt.succeeded.is_(False)
            )
        ).one()
        if failures >= limit:
            # SQLite hands datetimes back without a zone; they were written in UTC.
            first = oldest if oldest.tzinfo else oldest.replace(tzinfo=now.tzinfo)
            raise TooManyAttempts(first + window - now)
