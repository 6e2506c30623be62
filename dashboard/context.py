"""What every dashboard page shares: settings, sessions, the store, and who is logged in.

Built once per Streamlit server (``st.cache_resource``), not once per page or per rerun, from the
one ``Settings()`` read at this entry point. Pages get sessions from here and pass them to
``radflow.services``; they never build SQL themselves.

Login state lives in Streamlit's per-connection session state, on the server: the browser holds
no token to steal or forge. Every page run re-reads the user from the database (a role change or
deactivation applies at the next click) and enforces the idle timeout.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import streamlit as st
from numpy.typing import NDArray
from sqlalchemy.orm import Session

from radflow.runtime import Runtime
from radflow.services.study_view import Window, render_image
from radflow.services.users import Permission, Principal, get_principal
from radflow.settings import Settings

# Not "pages/": Streamlit would also serve every script in a folder of that name directly,
# around app.py and its login check.
PAGES = Path(__file__).resolve().parent / "views"
LOGIN_PAGE = PAGES / "login.py"
WORKLIST_PAGE = PAGES / "worklist.py"
STUDY_PAGE = PAGES / "study.py"
MODELS_PAGE = PAGES / "models.py"
PIPELINE_PAGE = PAGES / "pipeline.py"
AUDIT_PAGE = PAGES / "audit.py"
STUDY_PARAM = "study"
"""Query parameter naming the open study: /study?study=<Study Instance UID>."""

AUTH_KEY = "radflow_auth"
"""Session-state entry: {"name": user name, "seen": monotonic time of the last page run}."""
NOTICE_KEY = "radflow_notice"


@st.cache_resource(show_spinner=False)
def runtime() -> Runtime:
    """The server's settings, engine, session factory and store.

    Migrating on open matches every other entry point, so a fresh data dir shows the empty
    worklist instead of a missing-table error.
    """
    return Runtime.open(Settings())


@contextmanager
def session() -> Iterator[Session]:
    """A read-only session for one page run: nothing is committed."""
    with runtime().session_factory() as s:
        yield s


@contextmanager
def transaction() -> Iterator[Session]:
    """A unit of work: committed when the block ends (audit events, reviews, promotions)."""
    with runtime().transaction() as s:
        yield s


def client_address() -> str:
    """The browser's address as Streamlit sees it (behind a proxy: the proxy's)."""
    address = st.context.ip_address
    return address if isinstance(address, str) and address else "unknown"


def sign_in(principal: Principal) -> None:
    st.session_state[AUTH_KEY] = {"name": principal.name, "seen": time.monotonic()}


def sign_out(notice: str | None = None) -> None:
    st.session_state.pop(AUTH_KEY, None)
    if notice:
        st.session_state[NOTICE_KEY] = notice


def current_user() -> Principal | None:
    """The logged-in user, or None (never logged in, idle too long, or since deactivated)."""
    auth = st.session_state.get(AUTH_KEY)
    if not auth:
        return None
    idle_s = runtime().settings.session_idle_minutes * 60
    now = time.monotonic()
    if now - float(auth["seen"]) > idle_s:
        sign_out("Your session was idle too long: please log in again.")
        return None
    with session() as s:
        principal = get_principal(s, str(auth["name"]))
    if principal is None:
        sign_out("Your account is no longer active.")
        return None
    auth["seen"] = now
    return principal


def require_page(permission: Permission) -> Principal:
    """The logged-in user if their role grants ``permission``; otherwise the page stops here.

    app.py already lists only the pages a role may open; this check is what holds if a page is
    reached some other way.
    """
    principal = current_user()
    if principal is None:
        st.warning("Please log in.")
        st.stop()
    if not principal.can(permission):
        st.error(f"{principal.name} ({principal.role}) may not open this page.")
        st.stop()
    return principal


@st.cache_data(max_entries=64, show_spinner=False)
def rendered_image(
    object_key: str, window: Window | None = None, frame: int | None = None
) -> NDArray[np.uint8]:
    # A key always names the same bytes (originals are immutable), so it is a safe cache key.
    return render_image(runtime().store, object_key, window=window, frame=frame)
