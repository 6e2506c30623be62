"""Audit trail (admins): who viewed, labelled, trained and promoted what, and when."""

from __future__ import annotations

import math
from dataclasses import asdict
from datetime import UTC, date, datetime, time, timedelta

import pandas as pd
import streamlit as st

from dashboard import context, text
from radflow.services.audit import AuditFilter, choices, list_events
from radflow.services.users import Permission

user = context.require_page(Permission.VIEW_AUDIT)
ALL = "all"
PAGE_SIZE = 100

st.title("Audit trail")
with context.session() as session:
    actors, actions = choices(session, user)

columns = st.columns(4)
actor = columns[0].selectbox("Who", [ALL, *actors], key="audit_actor")
action = columns[1].selectbox("Action", [ALL, *actions], key="audit_action")
object_id = columns[2].text_input("Object", placeholder="Study UID or task:vN", key="audit_object")
days = columns[3].date_input("Between", value=[], key="audit_days")
chosen = [d for d in (days if isinstance(days, tuple | list) else [days]) if isinstance(d, date)]
where = AuditFilter(
    actor=None if actor == ALL else actor,
    action=None if action == ALL else action,
    object_id=object_id or None,
    since=datetime.combine(chosen[0], time.min, tzinfo=UTC) if chosen else None,
    until=datetime.combine(chosen[-1], time.min, tzinfo=UTC) + timedelta(days=1)
    if chosen
    else None,
)

with context.session() as session:
    _, total = list_events(session, user, where, limit=1)
page = st.pagination(max(1, math.ceil(total / PAGE_SIZE)), key=f"audit_page:{where}")
with context.session() as session:
    rows, total = list_events(session, user, where, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)

if not rows:
    st.info("No audit events match.")
else:
    st.caption(f"{total} events, newest first.")
    frame = pd.DataFrame([asdict(r) for r in rows])
    frame["details"] = frame["details"].map(lambda d: ", ".join(f"{k}={v}" for k, v in d.items()))
    st.dataframe(
        text.table(frame),
        hide_index=True,
        column_config={
            "at": st.column_config.DatetimeColumn("When (UTC)", format="YYYY-MM-DD HH:mm:ss"),
            "actor": "Who",
            "action": "Action",
            "object_type": "Type",
            "object_id": "Object",
            "details": "Details",
        },
    )
