"""Radflow review dashboard: the Streamlit script that dashboard/server.py serves.

This file only sets up navigation for who is logged in; each page lives in ``dashboard/views``,
the shared resources in ``dashboard/context.py``, and logging in happens before this script
ever runs (``dashboard/gate.py``). With a live session the server knows only the pages the
user's role allows; without one (the session ended while the page was open) every path shows
the "log in again" page, so nothing stays readable and no "page not found" notice appears.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard import context, text
from radflow.services.users import Permission

# A local file: a material icon name here would make the browser fetch it from another host.
ICON = Path(__file__).resolve().parent / "icon.svg"
# (permission, script, title, url path, icon, shown in the menu); the first is the default.
PAGES = [
    (Permission.VIEW_STUDIES, context.WORKLIST_PAGE, "Worklist", "", ":material/list:", True),
    # Reached by picking a study on the worklist, so it has no menu entry of its own.
    (Permission.VIEW_STUDIES, context.STUDY_PAGE, "Study", "study", None, False),
    (
        Permission.VIEW_MODELS,
        context.MODELS_PAGE,
        "Models",
        "models",
        ":material/model_training:",
        True,
    ),
    (
        Permission.VIEW_PIPELINE,
        context.PIPELINE_PAGE,
        "Pipeline",
        "pipeline",
        ":material/conveyor_belt:",
        True,
    ),
    (Permission.VIEW_AUDIT, context.AUDIT_PAGE, "Audit trail", "audit", ":material/policy:", True),
    (Permission.MANAGE_USERS, context.USERS_PAGE, "Users", "users", ":material/group:", True),
]

st.set_page_config(page_title="Radflow", page_icon=str(ICON), layout="wide")
context.runtime()  # open the database and store first, so a bad setting fails right here


@st.fragment(run_every=context.idle_check_seconds())
def _idle_watch() -> None:
    """Runs by itself while the page is open: ends the page once the session has ended."""
    if not context.session_alive():
        st.rerun(scope="app")


user = context.current_user()
if user is None:
    navigation = st.navigation(
        [
            st.Page(
                context.SIGNED_OUT_PAGE,
                title="Log in",
                url_path=path or None,
                default=not path,
                visibility="visible" if not path else "hidden",
            )
            for _, _, _, path, _, _ in PAGES
        ],
        position="hidden",
    )
else:
    navigation = st.navigation(
        [
            st.Page(
                script,
                title=title,
                url_path=path or None,
                icon=icon,
                default=not path,
                visibility="visible" if shown else "hidden",
            )
            for permission, script, title, path, icon, shown in PAGES
            if user.can(permission)
        ]
    )
    with st.sidebar:
        text.caption(f"Logged in as {user.name} ({user.role})")
        if st.button("Log out", icon=":material/logout:"):
            context.sign_out()
            st.rerun()
    _idle_watch()
navigation.run()
