"""The dashboard's web server: Streamlit serving dashboard/app.py behind Radflow's gate.

``radflow dashboard`` runs ``streamlit run dashboard/server.py``; Streamlit finds the ``st.App``
below and serves it with its own Starlette app, to which this adds the login routes and the
``Guard`` middleware (dashboard/gate.py).
"""

from __future__ import annotations

import importlib
import threading
from pathlib import Path

import streamlit as st
from starlette.middleware import Middleware

from dashboard.gate import Guard, routes

SCRIPT = Path(__file__).resolve().parent / "app.py"
# What the study page imports beyond the worklist: Prefect (flows.launcher) and the viewer's
# packing take seconds to import, which the first study opened after a restart would wait for.
WARM_UP = ("flows.launcher", "radflow.services.volume_view")


def _warm_up() -> None:
    for name in WARM_UP:
        importlib.import_module(name)


threading.Thread(target=_warm_up, name="radflow-warm-up", daemon=True).start()

app = st.App(SCRIPT, routes=routes(), middleware=[Middleware(Guard)])
