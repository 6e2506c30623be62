"""Dashboard users: roles, permissions, argon2 passwords, throttled login, account lifecycle.

Every service function that performs an action takes the acting ``Principal`` and calls
``require(principal, permission)`` itself, so hiding a button is never the only protection.
Every change to an account is audited, with the actor who made it.

Login throttling is per (user name, client address): after ``login_free_failures`` consecutive
wrong passwords each further attempt from that client must wait, the wait doubling up to
``login_max_delay_minutes``. One conditional UPDATE claims an attempt, so parallel attempts are
counted one by one; and wrong passwords typed for other names, or from other clients, never
slow a user down (no lockout of everyone behind one proxy address).
"""

from __future__ import annotations

import enum
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import case, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from zxcvbn import zxcvbn

from radflow.db import DashboardSession, LoginThrottle, User
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
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MAX_PASSWORD_LENGTH = 1024  # argon2 takes any length; this bounds the work an attacker buys


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
    VIEW_INPUT_DETAILS = "view-input-details"
    """Rejected inputs' file names and messages, which can hold names and record numbers."""
    RESEND_RESULTS = "resend-results"
    VIEW_AUDIT = "view-audit"
    MANAGE_USERS = "manage-users"


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
        self.principal = principal
        self.permission = permission


class LoginFailed(RadflowError):
    """Wrong name or password (deliberately not saying which)."""

    def __init__(self) -> None:
        super().__init__("wrong user name or password")


class TooManyAttempts(RadflowError):
    def __init__(self, retry_after: timedelta) -> None:
        seconds = max(1, round(retry_after.total_seconds()))
        wait = f"{seconds} seconds" if seconds < 120 else f"about {round(seconds / 60)} minutes"
        super().__init__(
            f"too many wrong passwords from this address: try again in {wait}, "
            "or ask an admin to unlock your account"
        )
        self.retry_after = retry_after


class PasswordChangeRequired(RadflowError):
    """The password was right, but an admin reset it: a new one must be chosen first."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name}'s password was reset by an admin: choose a new password")
        self.name = name


class UserExists(RadflowError):
    def __init__(self, name: str) -> None:
        super().__init__(f"user {name!r} already exists; choose another name")


class UnknownUser(RadflowError, LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no user {name[:80]!r}; `radflow user list` shows who exists")


class WeakPassword(RadflowError, ValueError):
    """A new password the policy refuses; the message says why."""


@dataclass(frozen=True)
class PasswordPolicy:
    """What a new password must meet: a length, and a zxcvbn score (0-4).

    zxcvbn's dictionaries hold the 30,000 most common passwords, names and words; a password
    made of them, of the user's own name, or of keyboard patterns scores low.
    """

    min_length: int = 12
    min_strength: int = 3

    @classmethod
    def from_settings(cls, settings: Settings) -> PasswordPolicy:
        return cls(settings.password_min_length, settings.password_min_strength)

    def check(self, password: str, name: str) -> None:
        if len(password) < self.min_length:
            raise WeakPassword(f"password must be at least {self.min_length} characters long")
        if len(password) > _MAX_PASSWORD_LENGTH:
            raise WeakPassword(f"password must be at most {_MAX_PASSWORD_LENGTH} characters long")
        verdict = zxcvbn(password[:100], user_inputs=[name, "radflow"])
        if verdict["score"] < self.min_strength:
            warning = verdict["feedback"]["warning"] or "it is too easy to guess"
            hints = " ".join(verdict["feedback"]["suggestions"])
            raise WeakPassword(f"password refused: {warning.rstrip('.')}. {hints}".strip())


@dataclass(frozen=True)
class UserRow:
    name: str
    role: str
    active: bool
    must_change_password: bool
    created_at: datetime
    throttled: bool
    """Some client must currently wait before trying this user's password again."""


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


def add_user(
    session: Session,
    name: str,
    role: Role | str,
    password: str,
    *,
    actor: Principal,
    policy: PasswordPolicy | None = None,
    must_change_password: bool = False,
) -> User:
    """Create a user with an argon2 hash of ``password`` (which must meet the policy).

    ``must_change_password``: ``password`` is a temporary one the user replaces at first login.
    """
    require(actor, Permission.MANAGE_USERS)
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"user name {name[:80]!r} must be 1-64 letters, digits, '.', '_', '@' or '-'"
        )
    role = parse_role(role) if isinstance(role, str) else role
    (policy or PasswordPolicy()).check(password, name)
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise UserExists(name)
    user = User(
        name=name,
        role=role.value,
        password_hash=_HASHER.hash(password),
        must_change_password=must_change_password,
    )
    session.add(user)
    session.flush()
    session.add(record(actor.name, "user-add", "user", name, role=role.value))
    return user


def list_users(session: Session, actor: Principal, *, now: datetime | None = None) -> list[UserRow]:
    require(actor, Permission.MANAGE_USERS)
    now = now or utcnow()
    throttled = set(
        session.scalars(
            select(LoginThrottle.username).where(LoginThrottle.blocked_until > now).distinct()
        )
    )
    return [
        UserRow(u.name, u.role, u.active, u.must_change_password, u.created_at, u.name in throttled)
        for u in session.scalars(select(User).order_by(User.name))
    ]


def set_active(session: Session, actor: Principal, name: str, active: bool) -> None:
    """Deactivate (every open session of the user ends at once) or reactivate an account."""
    require(actor, Permission.MANAGE_USERS)
    if not active and name == actor.name:
        raise ValueError("you cannot deactivate your own account; ask another admin")
    user = _user(session, name)
    user.active = active
    if not active:
        end_user_sessions(session, name, "deactivated")
    session.add(record(actor.name, "user-activate" if active else "user-deactivate", "user", name))


def change_role(session: Session, actor: Principal, name: str, role: Role | str) -> None:
    """A new role applies at the user's next click (every page run re-reads it)."""
    require(actor, Permission.MANAGE_USERS)
    role = parse_role(role) if isinstance(role, str) else role
    user = _user(session, name)
    previous, user.role = user.role, role.value
    session.add(record(actor.name, "user-role", "user", name, role=role.value, previous=previous))


def temporary_password() -> str:
    """A random password for a new or reset account (the user replaces it at first login)."""
    return secrets.token_urlsafe(18)


def reset_password(
    session: Session,
    actor: Principal,
    name: str,
    password: str | None = None,
    *,
    policy: PasswordPolicy | None = None,
) -> str:
    """Set a temporary password (``password``, or a random one) and return it.

    The user must choose a new password at their next login; their open sessions end and their
    login throttles are cleared.
    """
    require(actor, Permission.MANAGE_USERS)
    user = _user(session, name)
    temporary = password if password is not None else temporary_password()
    (policy or PasswordPolicy()).check(temporary, name)
    user.password_hash = _HASHER.hash(temporary)
    user.must_change_password = True
    end_user_sessions(session, name, "password-reset")
    session.execute(delete(LoginThrottle).where(LoginThrottle.username == name))
    session.add(record(actor.name, "user-reset-password", "user", name))
    return temporary


def unlock(session: Session, actor: Principal, name: str) -> int:
    """Clear the login waits of ``name`` on every client; returns how many were cleared."""
    require(actor, Permission.MANAGE_USERS)
    _user(session, name)
    cleared = session.execute(delete(LoginThrottle).where(LoginThrottle.username == name))
    session.add(record(actor.name, "user-unlock", "user", name))
    return int(getattr(cleared, "rowcount", 0) or 0)


def _user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise UnknownUser(name)
    return user


def end_user_sessions(session: Session, name: str, reason: str) -> None:
    """End every open dashboard session of ``name`` (audited once per session)."""
    now = utcnow()
    open_ids = session.scalars(
        select(DashboardSession.id).where(
            DashboardSession.user_name == name, DashboardSession.ended_at.is_(None)
        )
    ).all()
    for session_id in open_ids:
        session.add(record(name, "session-end", "session", session_id, reason=reason))
    if open_ids:
        session.execute(
            update(DashboardSession)
            .where(DashboardSession.id.in_(open_ids))
            .values(ended_at=now, end_reason=reason)
        )


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
    """Check a password; every attempt is throttled and audited.

    Raises LoginFailed, TooManyAttempts, or PasswordChangeRequired (right password, but an
    admin reset it). The caller commits the session even when this raises, so the attempt
    counts and the refusal is recorded.
    """
    now = now or utcnow()
    name, client = name.strip()[:64], (client or "unknown")[:64]
    try:
        failures = _claim_attempt(session, settings, name, client, now)
    except TooManyAttempts as exc:
        session.add(
            record(
                name or "-",
                "login-refused",
                "user",
                name or "-",
                client=client,
                retry_after_s=round(exc.retry_after.total_seconds()),
            )
        )
        raise
    user = session.scalar(select(User).where(User.name == name, User.active.is_(True)))
    ok = _verify(user.password_hash if user else _DUMMY_HASH, password) and user is not None
    _settle_attempt(session, settings, name, client, now, failures, ok)
    if not ok or user is None:
        session.add(record(name or "-", "login-failed", "user", name or "-", client=client))
        raise LoginFailed()
    if _HASHER.check_needs_rehash(user.password_hash):
        user.password_hash = _HASHER.hash(password)
    if user.must_change_password:
        raise PasswordChangeRequired(user.name)
    session.add(record(user.name, "login", "user", user.name, client=client))
    return Principal(user.name, parse_role(user.role))


def change_password(
    session: Session,
    settings: Settings,
    name: str,
    current: str,
    new: str,
    *,
    client: str = "unknown",
) -> Principal:
    """Replace a password after checking the current one (throttled like a login).

    This is how a user whose password an admin reset chooses a new one; it counts as a login.
    """
    policy = PasswordPolicy.from_settings(settings)
    try:
        authenticate(session, settings, name, current, client=client)
        resumed = True  # a normal login, already audited as one
    except PasswordChangeRequired:
        resumed = False
    if new == current:
        raise WeakPassword("the new password must differ from the current one")
    user = _user(session, name.strip())
    policy.check(new, user.name)
    user.password_hash = _HASHER.hash(new)
    user.must_change_password = False
    session.add(record(user.name, "password-change", "user", user.name, client=client))
    if not resumed:
        session.add(record(user.name, "login", "user", user.name, client=client))
    return Principal(user.name, parse_role(user.role))


def _verify(password_hash: str, password: str) -> bool:
    if len(password) > _MAX_PASSWORD_LENGTH:
        return False
    try:
        return _HASHER.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def _claim_attempt(
    session: Session, settings: Settings, name: str, client: str, now: datetime
) -> int:
    """Count this attempt as a failure in advance; returns the failures it would make.

    The conditional UPDATE is atomic: it holds the row (PostgreSQL) or the database (SQLite)
    until the caller commits, so a parallel attempt waits and then sees this one's outcome.
    """
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    session.execute(
        dialect.insert(LoginThrottle)
        # Unblocked since long ago: a parallel attempt that started a moment before this one
        # must not find the row blocked until this attempt's "now".
        .values(username=name, client=client, failures=0, last_attempt_at=now, blocked_until=_EPOCH)
        .on_conflict_do_nothing(index_elements=["username", "client"])
    )
    forget_before = now - timedelta(minutes=settings.login_max_delay_minutes)
    same = (LoginThrottle.username == name, LoginThrottle.client == client)
    failures = session.execute(
        update(LoginThrottle)
        .where(*same, LoginThrottle.blocked_until <= now)
        .values(
            failures=case(
                (LoginThrottle.last_attempt_at < forget_before, 1),
                else_=LoginThrottle.failures + 1,
            ),
            last_attempt_at=now,
        )
        .returning(LoginThrottle.failures)
    ).scalar_one_or_none()
    if failures is None:
        blocked_until = session.scalar(select(LoginThrottle.blocked_until).where(*same))
        assert blocked_until is not None  # inserted above
        # SQLite hands datetimes back without a zone; they were written in UTC.
        if blocked_until.tzinfo is None:
            blocked_until = blocked_until.replace(tzinfo=now.tzinfo)
        raise TooManyAttempts(blocked_until - now)
    return int(failures)


def _settle_attempt(
    session: Session,
    settings: Settings,
    name: str,
    client: str,
    now: datetime,
    failures: int,
    ok: bool,
) -> None:
    same = (LoginThrottle.username == name, LoginThrottle.client == client)
    if ok:
        session.execute(update(LoginThrottle).where(*same).values(failures=0))
    elif failures >= settings.login_free_failures:
        session.execute(
            update(LoginThrottle)
            .where(*same)
            .values(blocked_until=now + login_delay(settings, failures))
        )


def login_delay(settings: Settings, failures: int) -> timedelta:
    """The wait after ``failures`` consecutive wrong passwords (none within the free ones)."""
    extra = failures - settings.login_free_failures
    if extra < 0:
        return timedelta(0)
    seconds = settings.login_delay_seconds * 2.0 ** min(extra, 30)
    return min(timedelta(seconds=seconds), timedelta(minutes=settings.login_max_delay_minutes))
