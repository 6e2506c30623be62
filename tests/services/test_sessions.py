"""Dashboard sessions: a signed cookie bound to a server-side row that logout and idling end."""

from __future__ import annotations

from datetime import timedelta

from factories import make_user
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import AuditEvent, DashboardSession, unit_of_work
from radflow.db.base import utcnow
from radflow.services.sessions import (
    end_idle_sessions,
    end_session,
    ended_reason,
    resume,
    sign,
    start_session,
    unsign,
)
from radflow.services.users import Role, change_role
from radflow.settings import Settings

KEY = b"k" * 32


def test_only_a_cookie_signed_with_the_key_names_a_token() -> None:
    cookie = sign("token-1", KEY)
    assert unsign(cookie, KEY) == "token-1"
    assert unsign(cookie, b"other key" * 4) is None
    assert unsign("token-2." + cookie.split(".")[1], KEY) is None  # another token, old signature
    for junk in (None, "", "no-signature", "a.b.c"):
        assert unsign(junk, KEY) is None


def test_a_session_survives_until_logout_and_then_never_again(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    with unit_of_work(session_factory) as session:
        rita = make_user(session, "rita")
        token = start_session(session, rita, "10.0.0.1")
    with session_factory() as session:
        stored = session.scalars(select(DashboardSession.token_hash)).one()
    assert token not in stored  # only its hash: a copy of the database opens nothing
    for _ in range(2):  # a reload is just another page run
        with unit_of_work(session_factory) as session:
            live = resume(session, settings, token)
            assert live is not None and live.principal == rita
    with unit_of_work(session_factory) as session:
        end_session(session, token, "logout")
    with unit_of_work(session_factory) as session:
        assert resume(session, settings, token) is None
        assert ended_reason(session, token) == "logout"


def test_an_idle_session_ends_and_only_page_runs_count_as_activity(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    idle = timedelta(minutes=settings.session_idle_minutes)
    with unit_of_work(session_factory) as session:
        token = start_session(session, make_user(session, "rita"), "10.0.0.1")
    start = utcnow()
    with unit_of_work(session_factory) as session:
        # The page's idle watch looks without touching the session ...
        assert resume(session, settings, token, touch=False, now=start + idle * 0.9)
    with unit_of_work(session_factory) as session:
        # ... so, with no click since, the session is over when the timeout has passed.
        assert resume(session, settings, token, touch=False, now=start + idle * 1.1) is None
        assert ended_reason(session, token) == "idle"
    with session_factory() as session:
        ends = session.execute(
            select(AuditEvent.actor, AuditEvent.details).where(AuditEvent.action == "session-end")
        ).all()
    assert [(actor, details["reason"]) for actor, details in ends] == [("rita", "idle")]


def test_a_click_keeps_the_session_alive_and_a_role_change_applies_at_once(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    idle = timedelta(minutes=settings.session_idle_minutes)
    with unit_of_work(session_factory) as session:
        token = start_session(session, make_user(session, "rita"), "10.0.0.1")
    start = utcnow()
    with unit_of_work(session_factory) as session:
        assert resume(session, settings, token, now=start + idle * 0.9)  # a click
    with unit_of_work(session_factory) as session:
        change_role(session, make_user(session, "ada", Role.ADMIN), "rita", Role.ML_ENGINEER)
    with unit_of_work(session_factory) as session:
        live = resume(session, settings, token, now=start + idle * 1.5)
    assert live is not None and live.principal.role == Role.ML_ENGINEER


def test_a_session_abandoned_without_logout_is_ended_and_audited_by_the_sweep(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    """A closed tab never asks again: its end is still recorded (issue 16: every session end)."""
    idle = timedelta(minutes=settings.session_idle_minutes)
    with unit_of_work(session_factory) as session:
        rita, max_ = make_user(session, "rita"), make_user(session, "max")
        abandoned = start_session(session, rita, "10.0.0.1")
        start_session(session, max_, "10.0.0.2")
    later = utcnow() + idle * 1.5
    with unit_of_work(session_factory) as session:
        row = session.scalars(select(DashboardSession).where(DashboardSession.user_name == "max"))
        row.one().last_seen_at = later - idle / 2  # max is still working
    with unit_of_work(session_factory) as session:
        assert end_idle_sessions(session, settings, now=later) == 1
    with unit_of_work(session_factory) as session:
        assert end_idle_sessions(session, settings, now=later) == 0  # ended once only
        assert ended_reason(session, abandoned) == "idle"
        ends = session.scalars(select(AuditEvent).where(AuditEvent.action == "session-end")).all()
    assert [(e.actor, e.details["reason"]) for e in ends] == [("rita", "idle")]
