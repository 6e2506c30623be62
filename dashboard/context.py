"""What every dashboard page shares: settings, sessions, the store, and who is logged in.

Built once per Streamlit server (``st.cache_resource``), not once per page or per rerun, from the
one ``Settings()`` read at this entry point. Pages get sessions from here and pass them to
``radflow.services``; they never build SQL themselves.

Who is logged in comes from the session cookie the login page set (``dashboard/gate.py``): a
signed token naming a server-side session (``radflow.services.sessions``). Every page run
resumes that session from the database, so a reload keeps the login, while logout, the idle
timeout, a deactivation or a password reset end it for every tab at once; a role change applies
at the next click.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import streamlit as st
from numpy.typing import NDArray
from sqlalchemy.orm import Session

from dashboard.gate import cookie_key
from flows.launcher import Started, labels_recorded
from radflow.runtime import Runtime
from radflow.services.audit import note
from radflow.services.sessions import COOKIE, end_session, ended_reason, resume, unsign
from radflow.services.study_view import Window, render_image
from radflow.services.users import Permission, Principal
from radflow.services.volume_view import (
    Layer,
    VolumeView,
    heat_layer,
    label_layer,
    load_preview,
    load_volume_view,
)
from radflow.settings import Settings

# Not "pages/": Streamlit would also serve every script in a folder of that name directly,
# around app.py and its login check.
PAGES = Path(__file__).resolve().parent / "views"
SIGNED_OUT_PAGE = PAGES / "signed_out.py"
WORKLIST_PAGE = PAGES / "worklist.py"
STUDY_PAGE = PAGES / "study.py"
MODELS_PAGE = PAGES / "models.py"
PIPELINE_PAGE = PAGES / "pipeline.py"
AUDIT_PAGE = PAGES / "audit.py"
USERS_PAGE = PAGES / "users.py"
STUDY_PARAM = "study"
"""Query parameter naming the open study: /study?study=<Study Instance UID>."""

NOTICE_KEY = "radflow_notice"
SAVED_KEY = "radflow_saved"
"""What the study page confirms at its next run (a review was stored)."""
ENDED_BECAUSE = {
    "logout": "You have logged out.",
    "idle": "Your session was idle too long: please log in again.",
    "deactivated": "Your account is no longer active.",
    "password-reset": "An administrator reset your password: please log in again.",
}


@st.cache_resource(show_spinner=False)
def runtime() -> Runtime:
    """The server's settings, engine, session factory and store."""
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


def browser_cookie() -> str | None:
    """The session cookie the browser sent when this page connected."""
    return st.context.cookies.get(COOKIE)


def session_token() -> str | None:
    return unsign(browser_cookie(), cookie_key(runtime().settings))


def current_user() -> Principal | None:
    """The logged-in user, or None (never logged in, or the session ended).

    Counts as activity: the idle timeout starts again.
    """
    token = session_token()
    with transaction() as s:
        live = resume(s, runtime().settings, token)
        if live is None and token is not None:
            reason = ended_reason(s, token)
            if reason:
                st.session_state[NOTICE_KEY] = ENDED_BECAUSE.get(reason, "Your session ended.")
    return live.principal if live else None


def session_alive() -> bool:
    """Whether the session is still live, without counting as activity (the idle watch)."""
    with transaction() as s:
        return resume(s, runtime().settings, session_token(), touch=False) is not None


def idle_check_seconds() -> float:
    """How often an open page checks for the idle timeout while nobody touches it."""
    return min(30.0, max(1.0, runtime().settings.session_idle_minutes * 60 / 10))


def sign_out() -> None:
    with transaction() as s:
        end_session(s, session_token(), "logout")
    st.session_state[NOTICE_KEY] = ENDED_BECAUSE["logout"]


def require_page(permission: Permission) -> Principal:
    """The logged-in user if their role grants ``permission``; otherwise the page stops here.

    app.py already lists only the pages a role may open; this check is what holds if a page is
    reached some other way (and a refusal is audited).
    """
    principal = current_user()
    if principal is None:
        st.warning("Please log in.")
        st.stop()
    if not principal.can(permission):
        with transaction() as s:
            note(s, principal, "page-denied", "permission", permission.value)
        st.error(f"{principal.name} ({principal.role}) may not open this page.")
        st.stop()
    return principal


@st.cache_data(max_entries=64, show_spinner=False)
def rendered_image(
    object_key: str, window: Window | None = None, frame: int | None = None
) -> NDArray[np.uint8]:
    # A key always names the same bytes (originals are immutable), so it is a safe cache key.
    return render_image(runtime().store, object_key, window=window, frame=frame)


def saved(task: str, message: str, *, labelled: bool = True, rerun: bool = True) -> None:
    """Confirm a stored review at the page's next run, and rerun it now (unless the caller
    opens another page: ``rerun`` False).

    A new label counts toward retraining like any other (flows/launcher.py decides); a due
    training starts in the background, never in this page's process.
    """
    if labelled:
        started = labels_recorded(task, wait=False, rt=runtime())
        if isinstance(started, Started):
            message += f". Enough new labels: retraining {task} (process {started.ref})."
    st.session_state[SAVED_KEY] = message
    if rerun:
        st.rerun()


def _behind() -> None:
    # Packing a series takes seconds of both cores: it yields to page runs and to the rest of
    # the machine (other users' pages, a browser on the same host). Linux keeps a nice value
    # per thread, inherited by the threads it starts; elsewhere it is the whole process's.
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.nice(10)


_PACKER = ThreadPoolExecutor(1, thread_name_prefix="radflow-viewer", initializer=_behind)


@st.cache_resource(max_entries=4, show_spinner=False)
def volume_packing(series_uid: str, instance_keys: tuple[str, ...]) -> Future[VolumeView]:
    """The series packed for the viewer, in the background from the first page run that asks
    (the page shows a preview meanwhile), then kept for the next runs: a frozen object, shared
    read-only. ``instance_keys`` name its stored images: a late instance makes a new entry."""
    return _PACKER.submit(_pack, runtime(), series_uid)


def _pack(rt: Runtime, series_uid: str) -> VolumeView:
    with rt.session_factory() as s:
        return load_volume_view(s, rt.store, series_uid, max_voxels=rt.settings.max_volume_voxels)


@st.cache_resource(max_entries=8, show_spinner=False)
def volume_preview(series_uid: str, instance_keys: tuple[str, ...]) -> VolumeView | None:
    """The slice the viewer opens on, alone (``load_preview``); NotAVolume if the index says
    the series is not one volume."""
    rt = runtime()
    with session() as s:
        return load_preview(s, rt.store, series_uid, max_voxels=rt.settings.max_volume_voxels)


@st.cache_resource(max_entries=8, show_spinner=False)
def volume_layer(
    object_key: str, kind: str, name: str, instance_keys: tuple[str, ...], _view: VolumeView
) -> Layer:
    """A stored heat map (``kind`` "heat") or label map ("labels") laid over ``_view`` (the
    volume of the series ``instance_keys`` name)."""
    read = heat_layer if kind == "heat" else label_layer
    return read(runtime().store, object_key, _view, name)
