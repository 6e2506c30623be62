"""The dashboard's front door (dashboard/gate.py): login, the session cookie, images, headers.

The gate's routes and middleware run here in a bare Starlette app whose stand-in routes answer
where Streamlit's would (a page, an image, the metrics); the browser tests run the real server.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from factories import PASSWORD, make_user
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from dashboard import gate
from radflow.db import AuditEvent, DashboardSession, User, unit_of_work
from radflow.runtime import Runtime
from radflow.services.sessions import COOKIE
from radflow.services.users import Role
from radflow.settings import Settings

HTML = {"accept": "text/html,application/xhtml+xml"}


async def _streamlit(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"streamlit served {request.url.path}")


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    for name in list(os.environ):
        if name.upper().startswith("RADFLOW_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RADFLOW_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RADFLOW_LOGIN_FREE_FAILURES", "2")
    gate.runtime.cache_clear()
    with Runtime.open(Settings()) as rt:
        with unit_of_work(rt.session_factory) as session:
            make_user(session, "rita")
        yield rt
    gate.runtime.cache_clear()


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    stand_ins = [
        Route(path, _streamlit)
        for path in (
            "/",
            "/study",
            "/media/{id}",
            "/_stcore/metrics",
            "/static/app.js",
            "/component/{path:path}",
        )
    ]
    stand_ins.append(Route("/_stcore/upload_file/{session}/{file}", _streamlit, methods=["PUT"]))
    app = Starlette(routes=[*gate.routes(), *stand_ins], middleware=[Middleware(gate.Guard)])
    with TestClient(app, base_url="https://dashboard.example", follow_redirects=False) as c:
        yield c


def _log_in(client: TestClient, name: str, password: str, target: str = "/") -> object:
    form = client.get("/login", params={"next": target})
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert csrf is not None
    data = {"csrf": csrf.group(1), "name": name, "password": password, "next": target}
    return client.post("/login", data=data)


def _actions(runtime: Runtime) -> list[str]:
    with runtime.session_factory() as session:
        return list(session.scalars(select(AuditEvent.action).order_by(AuditEvent.seq)))


def test_a_deep_link_leads_through_the_login_and_back(client: TestClient, runtime: Runtime) -> None:
    link = "/study?study=1.2.826.0.1.3680043.8.498.1"
    first = client.get(link, headers=HTML)
    assert first.status_code == 303
    assert first.headers["location"] == "/login?next=%2Fstudy%3Fstudy%3D1.2.826.0.1.3680043.8.498.1"
    form = client.get(first.headers["location"])
    assert 'name="next" value="/study?study=1.2.826.0.1.3680043.8.498.1"' in form.text

    wrong = _log_in(client, "rita", "wrong password", link)
    assert wrong.status_code == 401 and "wrong user name or password" in wrong.text
    signed_in = _log_in(client, "rita", PASSWORD, link)
    assert signed_in.status_code == 303 and signed_in.headers["location"] == link
    cookie = next(c for c in signed_in.headers.get_list("set-cookie") if c.startswith(COOKIE))
    assert {"HttpOnly", "Secure", "SameSite=lax", "Path=/"} <= {
        part.strip() for part in cookie.split(";")
    }
    # The browser sends the cookie from now on: the page loads, again and again (reloads).
    for _ in range(2):
        page = client.get(link, headers=HTML)
        assert page.status_code == 200 and page.text == "streamlit served /study"
    assert _actions(runtime)[-2:] == ["login-failed", "login"]


def test_the_cookie_is_worth_nothing_forged_or_after_the_session_ended(
    client: TestClient, runtime: Runtime
) -> None:
    client.cookies.set(COOKIE, "forged-token.0123")
    assert client.get("/", headers=HTML).status_code == 303
    _log_in(client, "rita", PASSWORD)
    assert client.get("/", headers=HTML).status_code == 200
    with unit_of_work(runtime.session_factory) as session:
        row = session.scalars(select(DashboardSession)).one()
        row.ended_at, row.end_reason = row.last_seen_at, "logout"
    assert client.get("/", headers=HTML).status_code == 303


def test_forms_from_elsewhere_and_redirects_elsewhere_are_refused(client: TestClient) -> None:
    no_token = client.post("/login", data={"name": "rita", "password": PASSWORD})
    assert no_token.status_code == 400 and COOKIE not in no_token.headers.get("set-cookie", "")
    away = _log_in(client, "rita", PASSWORD, "//evil.example/phish")
    assert away.headers["location"] == "/"


def test_images_only_for_a_live_session_and_every_fetch_audited(
    client: TestClient, runtime: Runtime
) -> None:
    """A study image's URL is no use without the session that was shown it."""
    assert client.get("/media/c4516c86.jpg").status_code == 403
    _log_in(client, "rita", PASSWORD)
    image = client.get("/media/c4516c86.jpg")
    assert image.status_code == 200 and image.headers["cache-control"] == "no-store"
    with runtime.session_factory() as session:
        fetch = session.scalars(select(AuditEvent).where(AuditEvent.action == "image-fetch")).one()
    assert (fetch.actor, fetch.object_id) == ("rita", "c4516c86.jpg")
    with unit_of_work(runtime.session_factory) as session:
        session.scalars(select(User)).one().active = False  # deactivated while logged in
    assert client.get("/media/c4516c86.jpg").status_code == 403


def test_what_no_page_needs_is_closed_and_every_response_carries_the_headers(
    client: TestClient,
) -> None:
    for path in ("/_stcore/metrics", "/_stcore/agent/mcp", "/_stcore/script-health-check"):
        assert client.get(path).status_code == 404, path
    page = client.get("/login")
    policy = page.headers["content-security-policy"]
    for rule in ("default-src 'self'", "frame-ancestors 'none'", "object-src 'none'"):
        assert rule in policy
    assert "http" not in policy  # nothing may be fetched from another site
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["strict-transport-security"].startswith("max-age=")
    assert "no-store" not in client.get("/static/app.js").headers.get("cache-control", "")


def test_a_reset_password_is_replaced_before_the_first_page(
    client: TestClient, runtime: Runtime
) -> None:
    with unit_of_work(runtime.session_factory) as session:
        session.scalars(select(User)).one().must_change_password = True
    step = _log_in(client, "rita", PASSWORD, "/study?study=1.2.3")
    assert step.status_code == 200 and "choose your own" in step.text
    assert COOKIE not in step.headers.get("set-cookie", "")
    csrf = re.search(r'name="csrf" value="([^"]+)"', step.text)
    assert csrf is not None
    form = {
        "csrf": csrf.group(1),
        "name": "rita",
        "current": PASSWORD,
        "next": "/study?study=1.2.3",
    }
    weak = client.post("/password", data={**form, "new": "password1234", "repeat": "password1234"})
    assert weak.status_code == 400 and "password refused" in weak.text
    new = "a fresh staple battery horse"
    done = client.post("/password", data={**form, "new": new, "repeat": new})
    assert done.status_code == 303 and done.headers["location"] == "/study?study=1.2.3"
    assert client.get("/study", headers=HTML).status_code == 200


def test_guessing_is_slowed_and_says_how_long(client: TestClient) -> None:
    for _ in range(2):
        assert _log_in(client, "rita", "guess").status_code == 401
    waiting = _log_in(client, "rita", PASSWORD)
    assert waiting.status_code == 429 and "try again in 2 seconds" in waiting.text


def test_uploads_only_from_a_live_session_that_may_review(
    client: TestClient, runtime: Runtime
) -> None:
    """The one upload is a corrected mask: a reviewer's, never an anonymous or other role's."""
    upload = "/_stcore/upload_file/session-1/file-1"
    assert client.put(upload, content=b"mask").status_code == 403
    with unit_of_work(runtime.session_factory) as session:
        make_user(session, "max", Role.ML_ENGINEER)
    _log_in(client, "max", PASSWORD)
    assert client.put(upload, content=b"mask").status_code == 403
    client.cookies.clear()
    _log_in(client, "rita", PASSWORD)
    answer = client.put(upload, content=b"mask")
    assert answer.status_code == 200 and answer.text == f"streamlit served {upload}"


def test_a_component_may_be_framed_by_the_app_alone(client: TestClient) -> None:
    """The volume viewer is a custom component: Streamlit shows its files in an iframe of the
    app's own page, so they (and nothing else) may be framed, by this origin only."""
    viewer = client.get("/component/dashboard.viewer.viewer/index.html", headers=HTML)
    assert viewer.status_code == 200  # the viewer's code; its pixels come over the WebSocket
    policy = viewer.headers["content-security-policy"]
    assert "frame-ancestors 'self'" in policy
    assert "script-src 'self' " in policy  # no inline script: viewer.js is a file
    assert viewer.headers["x-frame-options"] == "SAMEORIGIN"
    page = client.get("/login")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
