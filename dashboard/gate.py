"""The dashboard's front door: login, the session cookie, and what every response carries.

Streamlit serves the pages over one WebSocket and cannot set cookies, so logging in happens
here, on plain HTTP routes in front of it (``dashboard/server.py`` mounts them in Streamlit's
own Starlette app):

- ``GET/POST /login`` checks the password (``radflow.services.users.authenticate``: throttled
  and audited), starts a server-side session and sets its signed cookie (HttpOnly,
  SameSite=Lax, Secure under HTTPS), then sends the browser on to the page it first asked for,
  so a shared link to a study opens that study once logged in. ``POST /password`` is where a
  user whose password an admin reset chooses a new one.
- ``Guard`` (middleware) sends a browser without a live session from any page to the login
  page, serves study images (``/media/``) only to a live session whose role may see studies
  (and audits each fetch), takes file uploads (a corrected mask) only from a live session whose
  role may review, closes what a browser never needs (``/_stcore/metrics``, the agent API), and
  adds frame, content-security and no-store headers to every response (custom components'
  files, ``/component/``, may be framed by the app's own pages only: the volume viewer is one,
  dashboard/viewer).

The Streamlit script checks the same cookie on every run (``dashboard/context.py``), so a page
never renders for a session that ended, whatever the order of events.
"""

from __future__ import annotations

import functools
import hashlib
import html
import logging
import re
import secrets
from base64 import b64encode
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from radflow.runtime import Runtime
from radflow.services.audit import note
from radflow.services.sessions import (
    COOKIE,
    end_idle_sessions,
    resume,
    sign,
    start_session,
    unsign,
)
from radflow.services.users import (
    LoginFailed,
    PasswordChangeRequired,
    Permission,
    Principal,
    TooManyAttempts,
    WeakPassword,
    authenticate,
    change_password,
)
from radflow.settings import Settings

logger = logging.getLogger(__name__)

CSRF_COOKIE = "radflow_login_csrf"
_PROCESS_KEY = secrets.token_bytes(32)
# Paths a browser needs before logging in (Streamlit's bundles, our login forms) or never needs
# a session for (the health check a load balancer or compose asks).
_PUBLIC = ("/static/", "/_stcore/health", "/_stcore/host-config", "/favicon.png", "/manifest.json")
_LOGIN_PATHS = ("/login", "/password")
_COMPONENTS = "/component/"  # custom components' own files (code, no patient data)
# Open in Streamlit by default, needed by no page of Radflow's: process metrics, the agent API
# (it can drive the app without a browser), the script health check.
_CLOSED = re.compile(r"^/_stcore/(metrics|agent(/.*)?|script-health-check)/?$|^/app/static/")
_UPLOADS = "/_stcore/upload_file"


@functools.cache
def runtime() -> Runtime:
    """The web side's database and store (the script has its own: dashboard.context)."""
    return Runtime.open(Settings())


def cookie_key(settings: Settings) -> bytes:
    """Signs session cookies: ``session_secret``, else a key made when this process started."""
    secret = settings.session_secret.get_secret_value()
    return hashlib.sha256(secret.encode()).digest() if secret else _PROCESS_KEY


@contextmanager
def _transaction() -> Iterator[Session]:
    with runtime().transaction() as session:
        yield session


def live_principal(cookie: str | None, *, touch: bool = False) -> Principal | None:
    """Who holds this cookie, if their session is live (blocking: call in a thread)."""
    settings = runtime().settings
    token = unsign(cookie, cookie_key(settings))
    if token is None:
        return None
    with _transaction() as session:
        live = resume(session, settings, token, touch=touch)
    return live.principal if live else None


# --- security headers ------------------------------------------------------------------------


@functools.cache
def _inline_script_hashes() -> str:
    """CSP hashes of the inline scripts in Streamlit's index.html (its page shell)."""
    index = files("streamlit").joinpath("static/index.html").read_text()
    scripts = re.findall(r"<script>(.*?)</script>", index, flags=re.S)
    return " ".join(
        f"'sha256-{b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts
    )


def security_headers(https: bool, *, framable: bool = False) -> dict[str, str]:
    """What every response carries: no framing, nothing fetched from another site, no caching
    of patient data, no referrer (URLs hold Study Instance UIDs).

    ``framable``: a custom component's files (``/component/``, e.g. the volume viewer), which
    Streamlit shows in an iframe of the app's own page: framed by this origin only."""
    ancestors = "'self'" if framable else "'none'"
    policy = "; ".join(
        [
            "default-src 'self'",
            f"script-src 'self' {_inline_script_hashes()}",
            # Streamlit's components style themselves at run time (emotion).
            "style-src 'self' 'unsafe-inline'",
            "img-src 'self' data: blob:",
            "font-src 'self' data:",
            "connect-src 'self'",
            "worker-src 'self' blob:",
            "frame-src 'self'",
            "object-src 'none'",
            "base-uri 'self'",
            "form-action 'self'",
            f"frame-ancestors {ancestors}",
        ]
    )
    headers = {
        "Content-Security-Policy": policy,
        "X-Frame-Options": "SAMEORIGIN" if framable else "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cross-Origin-Resource-Policy": "same-origin",
        "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
    }
    if https:
        headers["Strict-Transport-Security"] = "max-age=31536000"
    return headers


# --- the middleware --------------------------------------------------------------------------


class Guard:
    """ASGI middleware in front of everything Streamlit serves over HTTP (see the module doc)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # the WebSocket: the script checks the session each run
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        path = request.url.path
        https = scope.get("scheme") == "https"
        headers = security_headers(https, framable=path.startswith(_COMPONENTS))
        send = _with_headers(send, headers, cacheable=path.startswith("/static/"))
        if _CLOSED.match(path):
            await PlainTextResponse("Not found", status_code=404)(scope, receive, send)
            return
        if path.startswith("/media/"):
            if not await run_in_threadpool(_may_fetch_image, request):
                await PlainTextResponse("Log in to see images", status_code=403)(
                    scope, receive, send
                )
                return
        elif path.startswith(_UPLOADS):
            if not await run_in_threadpool(_may_upload, request):
                await PlainTextResponse("Log in as a reviewer to upload", status_code=403)(
                    scope, receive, send
                )
                return
        elif (
            _is_page(request)
            and await run_in_threadpool(live_principal, request.cookies.get(COOKIE)) is None
        ):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            login = "/login" + (f"?{urlencode({'next': target})}" if target != "/" else "")
            await RedirectResponse(login, status_code=303)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _is_page(request: Request) -> bool:
    """A browser asking for a page of the app (Streamlit answers every such path with it)."""
    path = request.url.path
    return (
        request.method == "GET"
        and "text/html" in request.headers.get("accept", "")  # not a favicon or a script
        and not path.startswith(_PUBLIC)
        and path not in _LOGIN_PATHS
        and not path.startswith(("/_stcore/", _COMPONENTS, "/media/"))
    )


def _may_fetch_image(request: Request) -> bool:
    """A live session whose role may see studies; the fetch is audited."""
    principal = live_principal(request.cookies.get(COOKIE))
    if principal is None or not principal.can(Permission.VIEW_STUDIES):
        return False
    with _transaction() as session:
        note(
            session,
            principal,
            "image-fetch",
            "media",
            request.url.path.removeprefix("/media/"),
            client=_client(request),
        )
    return True


def _may_upload(request: Request) -> bool:
    """A live session whose role may review (the only upload is a corrected mask)."""
    principal = live_principal(request.cookies.get(COOKIE))
    return principal is not None and principal.can(Permission.REVIEW)


def _with_headers(send: Send, headers: dict[str, str], *, cacheable: bool) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            out = MutableHeaders(scope=message)
            for name, value in headers.items():
                out[name] = value
            if not cacheable:  # pages, images, API answers: nothing kept on a shared workstation
                out["Cache-Control"] = "no-store"
        await send(message)

    return wrapped


# --- login routes ----------------------------------------------------------------------------


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _safe_next(target: str | None) -> str:
    """Only a path on this site: never another host (an open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


async def _form(request: Request) -> dict[str, str]:
    body = (await request.body()).decode("utf-8", errors="replace")
    return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}


async def login_page(request: Request) -> Response:
    return _login_form(
        request.query_params.get("next"),
        notice=request.query_params.get("notice"),
        csrf=request.cookies.get(CSRF_COOKIE),
    )


async def login(request: Request) -> Response:
    form = await _form(request)
    target = _safe_next(form.get("next"))
    if not _csrf_ok(request, form):
        return _login_form(target, error="The form expired: please try again.", status=400)
    name, password = form.get("name", ""), form.get("password", "")
    outcome = await run_in_threadpool(_authenticate, name, password, _client(request))
    if isinstance(outcome, PasswordChangeRequired):
        return _password_form(target, name, error=str(outcome), csrf=form["csrf"])
    if isinstance(outcome, Exception):
        status = 429 if isinstance(outcome, TooManyAttempts) else 401
        return _login_form(target, error=str(outcome), status=status, csrf=form["csrf"])
    return _signed_in(request, outcome, target)


async def password(request: Request) -> Response:
    form = await _form(request)
    target, name = _safe_next(form.get("next")), form.get("name", "")
    if not _csrf_ok(request, form):
        return _login_form(target, error="The form expired: please log in again.", status=400)
    csrf = form["csrf"]
    if form.get("new", "") != form.get("repeat", ""):
        return _password_form(
            target, name, error="The new passwords differ.", status=400, csrf=csrf
        )
    outcome = await run_in_threadpool(
        _change_password, name, form.get("current", ""), form.get("new", ""), _client(request)
    )
    if isinstance(outcome, WeakPassword):
        return _password_form(target, name, error=str(outcome), status=400, csrf=csrf)
    if isinstance(outcome, Exception):
        status = 429 if isinstance(outcome, TooManyAttempts) else 401
        return _login_form(target, error=str(outcome), status=status, csrf=csrf)
    return _signed_in(request, outcome, target)


def _authenticate(name: str, password: str, client: str) -> tuple[Principal, str] | Exception:
    """Check the password and start a session; the attempt is committed whatever the outcome."""
    return _attempt(
        lambda s: authenticate(s, runtime().settings, name, password, client=client), client
    )


def _change_password(
    name: str, current: str, new: str, client: str
) -> tuple[Principal, str] | Exception:
    settings = runtime().settings
    return _attempt(
        lambda s: change_password(s, settings, name, current, new, client=client), client
    )


def _attempt(
    check: Callable[[Session], Principal], client: str
) -> tuple[Principal, str] | Exception:
    with _transaction() as session:
        try:
            principal = check(session)
        except (LoginFailed, TooManyAttempts, PasswordChangeRequired, WeakPassword) as exc:
            return exc  # returned, not raised: the failed attempt must still be committed
        end_idle_sessions(session, runtime().settings)  # tabs closed without logging out
        return principal, start_session(session, principal, client)


def _signed_in(request: Request, outcome: tuple[Principal, str], target: str) -> Response:
    principal, token = outcome
    logger.info("%s logged in", principal.name)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE,
        sign(token, cookie_key(runtime().settings)),
        httponly=True,
        secure=request.url.scheme == "https",
        # Lax, not Strict: a link to a study in an e-mail (another site) must still carry the
        # cookie; other sites' forms and scripts never do, and no page acts on a GET.
        samesite="lax",
        path="/",
    )
    response.delete_cookie(CSRF_COOKIE, path="/")
    return response


def _csrf_ok(request: Request, form: dict[str, str]) -> bool:
    expected = request.cookies.get(CSRF_COOKIE, "")
    return bool(expected) and secrets.compare_digest(expected, form.get("csrf", ""))


# --- the login pages (plain HTML: no script, every value escaped) ----------------------------

_STYLE = """
body{font-family:"Source Sans Pro",system-ui,sans-serif;background:#f6f7f9;color:#262730;
margin:0;display:flex;min-height:100vh;align-items:center;justify-content:center}
main{background:#fff;padding:2rem 2.5rem;border-radius:.75rem;width:22rem;
box-shadow:0 1px 3px rgba(0,0,0,.12)}
h1{margin:0 0 .25rem;font-size:2rem}p.lead{color:#666;margin:0 0 1.5rem}
label{display:block;margin:.75rem 0 .25rem}input{width:100%;box-sizing:border-box;
padding:.5rem;font-size:1rem;border:1px solid #ccc;border-radius:.4rem}
button{margin-top:1.25rem;width:100%;padding:.6rem;font-size:1rem;border:0;border-radius:.4rem;
background:#ff4b4b;color:#fff;cursor:pointer}
.error{background:#fdecea;color:#8a1c1c;padding:.6rem .8rem;border-radius:.4rem}
.notice{background:#e8f1fd;color:#174ea6;padding:.6rem .8rem;border-radius:.4rem}
"""


def _page(title: str, body: str, status: int, csrf: str) -> HTMLResponse:
    document = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)} · Radflow</title><style>{_STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>"
    )
    response = HTMLResponse(document, status_code=status)
    response.set_cookie(CSRF_COOKIE, csrf, httponly=True, samesite="strict", path="/")
    return response


def _messages(error: str | None, notice: str | None) -> str:
    out = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    return out + (f'<p class="notice">{html.escape(notice)}</p>' if notice else "")


def _login_form(
    target: str | None,
    *,
    error: str | None = None,
    notice: str | None = None,
    status: int = 200,
    csrf: str | None = None,
) -> HTMLResponse:
    known = {"ended": "Your session has ended: please log in again."}
    csrf = csrf or secrets.token_urlsafe(24)
    body = f"""
<h1>Radflow</h1>
<p class="lead">Imaging AI review. Log in with the account an administrator created for you.</p>
{_messages(error, known.get(notice or ""))}
<form method="post" action="/login">
<input type="hidden" name="csrf" value="{csrf}">
<input type="hidden" name="next" value="{html.escape(_safe_next(target), quote=True)}">
<label for="name">User name</label>
<input id="name" name="name" autocomplete="username" required autofocus maxlength="64">
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit">Log in</button>
</form>"""
    return _page("Log in", body, status, csrf)


def _password_form(
    target: str | None,
    name: str,
    *,
    error: str | None = None,
    status: int = 200,
    csrf: str | None = None,
) -> HTMLResponse:
    csrf = csrf or secrets.token_urlsafe(24)
    body = f"""
<h1>New password</h1>
<p class="lead">An administrator reset the password of {html.escape(name)}: choose your own.</p>
{_messages(error, None)}
<form method="post" action="/password">
<input type="hidden" name="csrf" value="{csrf}">
<input type="hidden" name="next" value="{html.escape(_safe_next(target), quote=True)}">
<input type="hidden" name="name" value="{html.escape(name, quote=True)}">
<label for="current">Current password</label>
<input id="current" name="current" type="password" autocomplete="current-password" required>
<label for="new">New password</label>
<input id="new" name="new" type="password" autocomplete="new-password" required>
<label for="repeat">Repeat the new password</label>
<input id="repeat" name="repeat" type="password" autocomplete="new-password" required>
<button type="submit">Change password</button>
</form>"""
    return _page("New password", body, status, csrf)


def routes() -> list[Route]:
    return [
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/password", password, methods=["POST"]),
    ]


def login_url(path: str, *, notice: str | None = None) -> str:
    """Where the script sends a browser whose session ended (back to ``path`` afterwards)."""
    query: dict[str, Any] = {"next": _safe_next(path)}
    if notice:
        query["notice"] = notice
    return "/login?" + urlencode(query, quote_via=quote)
