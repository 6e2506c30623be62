"""What every dashboard page shares: settings, database sessions and the object store.

Built once per Streamlit server (``st.cache_resource``), not once per page or per rerun, from the
one ``Settings()`` read at this entry point. Pages get sessions from here and pass them to
``radflow.services``; they never build SQL themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import streamlit as st
from numpy.typing import NDArray
from sqlalchemy.orm import Session

from radflow.runtime import Runtime
from radflow.services.study_view import Window, render_image
from radflow.settings import Settings

PAGES = Path(__file__).resolve().parent / "pages"
WORKLIST_PAGE = PAGES / "worklist.py"
STUDY_PAGE = PAGES / "study.py"
STUDY_PARAM = "study"
"""Query parameter naming the open study: /study?study=<Study Instance UID>."""


@st.cache_resource(show_spinner=False)
def runtime() -> Runtime:
    """The server's settings, engine, session factory and store.

    Migrating on open matches every other entry point, so a fresh data dir shows the empty
    worklist instead of a missing-table error.
    """
    return Runtime.open(Settings())


@contextmanager
def session() -> Iterator[Session]:
    """A session for one page run; pages only read, so nothing is committed."""
    with runtime().session_factory() as s:
        yield s


@st.cache_data(max_entries=64, show_spinner=False)
def rendered_image(object_key: str, window: Window | None = None) -> NDArray[np.uint8]:
    # A key always names the same bytes (originals are immutable), so it is a safe cache key.
    return render_image(runtime().store, object_key, window=window)
