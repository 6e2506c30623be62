"""Users: argon2 hashes, roles and permissions, rate-limited login that survives restarts."""

from __future__ import annotations

from datetime import timedelta

import pytest
from factories import PASSWORD, make_user
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import AuditEvent, LoginAttempt, User, unit_of_work
from radflow.db.base import utcnow
from radflow.services.users import (
    LoginFailed,
    Permission,
    PermissionDenied,
    Principal,
    Role,
    TooManyAttempts,
    UserExists,
    add_user,
    authenticate,
    get_principal,
    require,
)
from radflow.settings import Settings


def login(
    factory: sessionmaker[Session], settings: Settings, name: str, password: str, **kw: object
) -> Principal:
    # Each attempt is its own transaction, as on the login page: failures are committed too.
    with factory() as session:
        try:
            return authenticate(session, settings, name, password, **kw)  # type: ignore[arg-type]
        finally:
            session.commit()


def test_password_is_stored_only_as_an_argon2_hash(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    with unit_of_work(session_factory) as session:
        make_user(session, "rita", Role.RADIOLOGIST)
    with session_factory() as session:
        stored = session.scalars(select(User.password_hash)).one()
    assert stored.startswith("$argon2id$")
    assert PASSWORD not in stored
    assert login(session_factory, settings, "rita", PASSWORD) == Principal("rita", Role.RADIOLOGIST)
    with pytest.raises(LoginFailed, match="wrong user name or password"):
        login(session_factory, settings, "rita", "wrong password")
    with pytest.raises(LoginFailed):
        login(session_factory, settings, "nobody", PASSWORD)
    with session_factory() as session:
        actions = session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)).all()
    assert actions == ["user-add", "login", "login-failed", "login-failed"]


def test_bad_names_roles_passwords_and_duplicates_are_refused(
    session_factory: sessionmaker[Session],
) -> None:
    with unit_of_work(session_factory) as session:
        make_user(session, "rita")
        with pytest.raises(UserExists):
            add_user(session, "rita", "admin", PASSWORD)
        with pytest.raises(ValueError, match="radiologist, ml-engineer, admin"):
            add_user(session, "sam", "surgeon", PASSWORD)
        with pytest.raises(ValueError, match="at least 8"):
            add_user(session, "sam", "admin", "short")
        with pytest.raises(ValueError, match="user name"):
            add_user(session, "../root", "admin", PASSWORD)


def test_roles_grant_their_permissions_only() -> None:
    radiologist = Principal("rita", Role.RADIOLOGIST)
    engineer = Principal("max", Role.ML_ENGINEER)
    admin = Principal("ada", Role.ADMIN)
    require(radiologist, Permission.REVIEW)
    with pytest.raises(PermissionDenied, match="rita \\(radiologist\\) may not promote"):
        require(radiologist, Permission.PROMOTE)
    with pytest.raises(PermissionDenied):
        require(engineer, Permission.REVIEW)
    with pytest.raises(PermissionDenied):
        require(engineer, Permission.VIEW_AUDIT)
    for permission in Permission:
        require(admin, permission)


def test_failures_lock_the_user_out_across_restarts(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    settings = settings.model_copy(update={"login_max_failures": 3})
    with unit_of_work(session_factory) as session:
        make_user(session, "rita")
    for _ in range(3):
        with pytest.raises(LoginFailed):
            login(session_factory, settings, "rita", "guess", client="10.0.0.1")
    # Even the right password is refused now, and the attempts live in the database: a new
    # session (as after a dashboard restart) sees them.
    with pytest.raises(TooManyAttempts, match="try again in about 15 minute"):
        login(session_factory, settings, "rita", PASSWORD, client="10.0.0.2")
    later = utcnow() + timedelta(minutes=16)
    assert login(session_factory, settings, "rita", PASSWORD, now=later).name == "rita"
    with session_factory() as session:
        assert session.scalar(select(LoginAttempt).where(LoginAttempt.succeeded)) is not None


def test_one_client_guessing_many_names_is_limited_too(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    settings = settings.model_copy(update={"login_max_failures": 1})  # 4 per client
    with unit_of_work(session_factory) as session:
        make_user(session, "rita")
    for n in range(4):
        with pytest.raises(LoginFailed):
            login(session_factory, settings, f"user{n}", "guess", client="10.9.9.9")
    with pytest.raises(TooManyAttempts):
        login(session_factory, settings, "rita", PASSWORD, client="10.9.9.9")
    assert login(session_factory, settings, "rita", PASSWORD, client="10.0.0.5").name == "rita"


def test_deactivated_users_cannot_log_in_or_stay_logged_in(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    with unit_of_work(session_factory) as session:
        make_user(session, "rita")
    with unit_of_work(session_factory) as session:
        assert get_principal(session, "rita") is not None
        session.scalars(select(User)).one().active = False
    with session_factory() as session:
        assert get_principal(session, "rita") is None
    with pytest.raises(LoginFailed):
        login(session_factory, settings, "rita", PASSWORD)
