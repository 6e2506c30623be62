"""Users: argon2 hashes, roles, password policy, login throttling, and the account lifecycle."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from factories import FACTORY_ACTOR, PASSWORD, make_user
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import AuditEvent, DashboardSession, User, unit_of_work
from radflow.db.base import utcnow
from radflow.services.sessions import resume, start_session
from radflow.services.users import (
    LoginFailed,
    PasswordChangeRequired,
    PasswordPolicy,
    Permission,
    PermissionDenied,
    Principal,
    Role,
    TooManyAttempts,
    UnknownUser,
    UserExists,
    WeakPassword,
    add_user,
    authenticate,
    change_password,
    change_role,
    get_principal,
    list_users,
    require,
    reset_password,
    set_active,
    unlock,
)
from radflow.settings import Settings

ADMIN = Principal("ada", Role.ADMIN)


def login(
    factory: sessionmaker[Session], settings: Settings, name: str, password: str, **kw: object
) -> Principal:
    # Each attempt is its own transaction, as on the login page: failures are committed too.
    with factory() as session:
        try:
            return authenticate(session, settings, name, password, **kw)  # type: ignore[arg-type]
        finally:
            session.commit()


def audited(factory: sessionmaker[Session], action: str) -> list[tuple[str, str]]:
    with factory() as session:
        rows = session.execute(
            select(AuditEvent.actor, AuditEvent.object_id)
            .where(AuditEvent.action == action)
            .order_by(AuditEvent.seq)
        )
        return [(r.actor, r.object_id) for r in rows]


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
        actions = session.scalars(select(AuditEvent.action).order_by(AuditEvent.seq)).all()
    assert actions == ["user-add", "login", "login-failed", "login-failed"]


def test_bad_names_roles_duplicates_and_weak_passwords_are_refused(
    session_factory: sessionmaker[Session],
) -> None:
    with unit_of_work(session_factory) as session:
        make_user(session, "rita")
        with pytest.raises(UserExists):
            add_user(session, "rita", "admin", PASSWORD, actor=ADMIN)
        with pytest.raises(ValueError, match="radiologist, ml-engineer, admin"):
            add_user(session, "sam", "surgeon", PASSWORD, actor=ADMIN)
        with pytest.raises(ValueError, match="user name"):
            add_user(session, "../root", "admin", PASSWORD, actor=ADMIN)
        # Eleven characters: too short, however random.
        with pytest.raises(WeakPassword, match="at least 12"):
            add_user(session, "sam", "admin", "x7#Lq9!vR2m", actor=ADMIN)
        # Long enough, but among the most common passwords or made of the user's own name.
        for common in ("password1234", "qwertyuiop123", "sam-password"):
            with pytest.raises(WeakPassword, match="password refused"):
                add_user(session, "sam", "admin", common, actor=ADMIN)
        with pytest.raises(PermissionDenied):
            add_user(session, "sam", "admin", PASSWORD, actor=Principal("rita", Role.RADIOLOGIST))


def test_the_policy_is_configurable() -> None:
    PasswordPolicy(min_length=8, min_strength=0).check("password", "sam")
    with pytest.raises(WeakPassword, match="at least 30"):
        PasswordPolicy(min_length=30).check(PASSWORD, "sam")
    settings = Settings(password_min_length=16, password_min_strength=4)
    assert PasswordPolicy.from_settings(settings) == PasswordPolicy(16, 4)


def test_roles_grant_their_permissions_only() -> None:
    radiologist = Principal("rita", Role.RADIOLOGIST)
    engineer = Principal("max", Role.ML_ENGINEER)
    require(radiologist, Permission.REVIEW)
    with pytest.raises(PermissionDenied, match="rita \\(radiologist\\) may not promote"):
        require(radiologist, Permission.PROMOTE)
    for denied in (Permission.REVIEW, Permission.VIEW_AUDIT, Permission.MANAGE_USERS):
        with pytest.raises(PermissionDenied):
            require(engineer, denied)
    for permission in Permission:
        require(ADMIN, permission)


def test_parallel_wrong_passwords_are_counted_one_by_one(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    """Twelve simultaneous guesses against a budget of five: only five are checked."""
    # A first wait longer than any scheduling delay on a loaded machine: the seventh guess
    # must find the account waiting, however late its thread runs.
    settings = settings.model_copy(update={"login_delay_seconds": 600.0})
    with unit_of_work(session_factory) as session:
        make_user(session, "rita")
    outcomes: list[str] = []
    start = threading.Barrier(12)

    def guess() -> None:
        start.wait()
        try:
            login(session_factory, settings, "rita", "guess", client="10.0.0.9")
        except (LoginFailed, TooManyAttempts) as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=guess) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["LoginFailed"] * 5 + ["TooManyAttempts"] * 7
    assert len(audited(session_factory, "login-refused")) == 7


def test_waits_grow_per_user_and_client_and_end_by_themselves(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    settings = settings.model_copy(update={"login_free_failures": 3, "login_delay_seconds": 10})
    with unit_of_work(session_factory) as session:
        make_user(session, "rita")
    now = utcnow()
    for _ in range(3):
        with pytest.raises(LoginFailed):
            login(session_factory, settings, "rita", "guess", client="10.0.0.1", now=now)
    # Even the right password waits now, from this client, and the wait lives in the database.
    with pytest.raises(TooManyAttempts, match="try again in 10 seconds") as refused:
        login(session_factory, settings, "rita", PASSWORD, client="10.0.0.1", now=now)
    assert refused.value.retry_after == timedelta(seconds=10)
    later = now + timedelta(seconds=11)
    with pytest.raises(LoginFailed):
        login(session_factory, settings, "rita", "guess", client="10.0.0.1", now=later)
    with pytest.raises(TooManyAttempts, match="try again in 20 seconds"):
        login(session_factory, settings, "rita", PASSWORD, client="10.0.0.1", now=later)
    # Rita at her own workstation is not slowed by the guesses from another address.
    assert login(session_factory, settings, "rita", PASSWORD, client="10.0.0.2", now=later)
    much_later = later + timedelta(seconds=21)
    assert login(session_factory, settings, "rita", PASSWORD, client="10.0.0.1", now=much_later)
    # The success cleared the count: three fresh failures again before any wait.
    for _ in range(3):
        with pytest.raises(LoginFailed):
            login(session_factory, settings, "rita", "guess", client="10.0.0.1", now=much_later)
    assert audited(session_factory, "login-refused") == [("rita", "rita")] * 2


def test_failures_on_other_names_never_slow_a_user_down(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    """Everyone behind one proxy address: a colleague's (or an attacker's) failures on other
    names from that address leave rita's login alone."""
    settings = settings.model_copy(update={"login_free_failures": 1})
    with unit_of_work(session_factory) as session:
        make_user(session, "rita")
    for n in range(10):
        with pytest.raises(LoginFailed):
            login(session_factory, settings, f"user{n}", "guess", client="10.9.9.9")
    assert login(session_factory, settings, "rita", PASSWORD, client="10.9.9.9").name == "rita"


def test_deactivation_ends_sessions_and_logins_reactivation_restores(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    with unit_of_work(session_factory) as session:
        rita = make_user(session, "rita")
        token = start_session(session, rita, "10.0.0.1")
    with unit_of_work(session_factory) as session:
        set_active(session, ADMIN, "rita", False)
    with unit_of_work(session_factory) as session:
        assert get_principal(session, "rita") is None
        assert resume(session, settings, token) is None
        ended = session.scalars(select(DashboardSession.end_reason)).one()
    assert ended == "deactivated"
    with pytest.raises(LoginFailed):
        login(session_factory, settings, "rita", PASSWORD)
    with unit_of_work(session_factory) as session:
        with pytest.raises(ValueError, match="your own account"):
            set_active(session, ADMIN, "ada", False)
        set_active(session, ADMIN, "rita", True)
    assert login(session_factory, settings, "rita", PASSWORD).name == "rita"
    assert audited(session_factory, "user-deactivate") == [("ada", "rita")]
    assert audited(session_factory, "user-activate") == [("ada", "rita")]


def test_a_reset_password_must_be_changed_at_the_next_login(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    with unit_of_work(session_factory) as session:
        make_user(session, "rita")
    with unit_of_work(session_factory) as session:
        temporary = reset_password(session, ADMIN, "rita")
    with pytest.raises(LoginFailed):
        login(session_factory, settings, "rita", PASSWORD)
    with pytest.raises(PasswordChangeRequired):
        login(session_factory, settings, "rita", temporary)
    with unit_of_work(session_factory) as session, pytest.raises(WeakPassword):
        change_password(session, settings, "rita", temporary, "password1234")
    with unit_of_work(session_factory) as session:
        change_password(session, settings, "rita", temporary, "new horse battery staple")
    assert login(session_factory, settings, "rita", "new horse battery staple").name == "rita"
    assert audited(session_factory, "user-reset-password") == [("ada", "rita")]
    assert audited(session_factory, "password-change") == [("rita", "rita")]


def test_unlock_role_change_and_listing(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    settings = settings.model_copy(update={"login_free_failures": 1})
    with unit_of_work(session_factory) as session:
        make_user(session, "rita")
        make_user(session, "max", Role.ML_ENGINEER)
    with pytest.raises(LoginFailed):
        login(session_factory, settings, "rita", "guess", client="10.0.0.1")
    with pytest.raises(TooManyAttempts):
        login(session_factory, settings, "rita", PASSWORD, client="10.0.0.1")
    with session_factory() as session:
        listed = {u.name: u for u in list_users(session, ADMIN)}
        with pytest.raises(PermissionDenied):
            list_users(session, Principal("max", Role.ML_ENGINEER))
    assert listed["rita"].throttled and not listed["max"].throttled
    with unit_of_work(session_factory) as session:
        assert unlock(session, ADMIN, "rita") == 1
        change_role(session, ADMIN, "max", "admin")
        with pytest.raises(UnknownUser):
            change_role(session, ADMIN, "nobody", "admin")
    assert login(session_factory, settings, "rita", PASSWORD, client="10.0.0.1").name == "rita"
    with session_factory() as session:
        assert get_principal(session, "max") == Principal("max", Role.ADMIN)
    assert audited(session_factory, "user-unlock") == [("ada", "rita")]
    assert audited(session_factory, "user-role") == [("ada", "max")]
    assert audited(session_factory, "user-add") == [
        (FACTORY_ACTOR.name, "rita"),
        (FACTORY_ACTOR.name, "max"),
    ]
