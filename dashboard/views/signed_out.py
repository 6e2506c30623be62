"""Shown wherever the browser is when its session ends (logout, idle, deactivation).

Logging in happens on the login page in front of Streamlit (dashboard/gate.py), which then
brings the browser back to the page it was on.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import streamlit as st

from dashboard import context
from dashboard.gate import login_url

st.title("Radflow")
st.info(st.session_state.pop(context.NOTICE_KEY, None) or "Please log in.")
here = urlsplit(st.context.url or "/")
path = here.path + (f"?{here.query}" if here.query else "")
st.link_button("Log in", login_url(path), type="primary", icon=":material/login:")
