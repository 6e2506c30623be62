"""The dashboard's web server: Streamlit serving dashboard/app.py behind Radflow's gate.

``radflow dashboard`` runs ``streamlit run dashboard/server.py``; Streamlit finds the ``st.App``
below and serves it with its own Starlette app, to which this adds the login routes and the
``Guard`` middleware (dashboard/gate.py).
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st
from starlette.middleware import Middleware

from dashboard.gate import Guard, routes

SCRIPT = Path(__file__).resolve().parent / "app.py"

app = st.App(SCRIPT, routes=routes(), middleware=[Middleware(Guard)])
