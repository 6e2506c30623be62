"""Radflow review dashboard: ``streamlit run dashboard/app.py`` (what ``radflow dashboard`` runs).

This file only sets up login and navigation; each page lives in ``dashboard/pages`` and the
shared resources in ``dashboard/context.py``. Before login the login page is the only page the
server knows; after it, only the pages the user's role allows.
"""

from __future__ import annotations

import streamlit as st

from dashboard import context
from radflow.services.users import Permission

st.set_page_config(page_title="Radflow", page_icon=":material/radiology:", layout="wide")
context.runtime()  # open the database and store first, so a bad setting fails right here

user = context.current_user()
if user is None:
    navigation = st.navigation([st.Page(context.LOGIN_PAGE, title="Log in", default=True)])
else:
    pages = [
        (
            Permission.VIEW_STUDIES,
            st.Page(context.WORKLIST_PAGE, title="Worklist", icon=":material/list:", default=True),
        ),
        # Reached by picking a study on the worklist, so it has no menu entry of its own.
        (
            Permission.VIEW_STUDIES,
            st.Page(context.STUDY_PAGE, title="Study", url_path="study", visibility="hidden"),
        ),
        (
            Permission.VIEW_MODELS,
            st.Page(
                context.MODELS_PAGE,
                title="Models",
                url_path="models",
                icon=":material/model_training:",
            ),
        ),
        (
            Permission.VIEW_PIPELINE,
            st.Page(
                context.PIPELINE_PAGE,
                title="Pipeline",
                url_path="pipeline",
                icon=":material/conveyor_belt:",
            ),
        ),
        (
            Permission.VIEW_AUDIT,
            st.Page(
                context.AUDIT_PAGE, title="Audit trail", url_path="audit", icon=":material/policy:"
            ),
        ),
    ]
    allowed = [page for permission, page in pages if user.can(permission)]
    # Kept (hidden) so a session that just logged in on it is sent on to the worklist.
    login = st.Page(context.LOGIN_PAGE, title="Log in", url_path="login", visibility="hidden")
    navigation = st.navigation([*allowed, login])
    with st.sidebar:
        st.caption(f"Logged in as **{user.name}** ({user.role})")
        if st.button("Log out", icon=":material/logout:"):
            context.sign_out("You have logged out.")
            st.rerun()
navigation.run()
