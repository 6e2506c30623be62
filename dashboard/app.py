"""Radflow review dashboard: ``streamlit run dashboard/app.py`` (what ``radflow dashboard`` runs).

This file only sets up navigation; each page lives in ``dashboard/pages`` and the shared
resources in ``dashboard/context.py``.
"""

from __future__ import annotations

import streamlit as st

from dashboard.context import STUDY_PAGE, WORKLIST_PAGE, runtime

st.set_page_config(page_title="Radflow", page_icon=":material/radiology:", layout="wide")

navigation = st.navigation(
    [
        st.Page(WORKLIST_PAGE, title="Worklist", icon=":material/list:", default=True),
        # Reached by picking a study on the worklist, so it has no menu entry of its own.
        st.Page(STUDY_PAGE, title="Study", url_path="study", visibility="hidden"),
    ]
)
runtime()  # open the database and store before any page, so a bad setting fails right here
navigation.run()
