"""Pipeline: is data flowing? Ingest rate, queues, rejected inputs and recent flow runs."""

from __future__ import annotations

from dataclasses import asdict

import pandas as pd
import plotly.express as px
import streamlit as st

from dashboard import context, text
from flows.launcher import FlowRunsUnavailable, recent_flow_runs
from radflow.services.pipeline import (
    ingest_rate,
    rejections,
    resend_results,
    results_out,
)
from radflow.services.status import platform_status
from radflow.services.users import Permission

user = context.require_page(Permission.VIEW_PIPELINE)
settings = context.runtime().settings

st.title("Pipeline")

with context.session() as session:
    status = platform_status(session, settings)
    hours = ingest_rate(session, user, hours=24)
    rejected, by_reason = rejections(session, user, limit=100)
    outgoing = results_out(session, user, limit=100)

numbers = {k: v for k, v in status.items() if isinstance(v, int)}
for column, (name, value) in zip(st.columns(max(1, len(numbers))), numbers.items(), strict=False):
    column.metric(name.replace("_", " ").capitalize(), value)
receiver = status["receiver"]
if receiver["indexing"] == "failed":
    st.error(
        f"The DICOM receiver refuses instances: {receiver['not_accepting_because']}",
        icon=":material/error:",
    )
elif receiver["indexing"] == "not running":
    st.info(
        "No DICOM receiver runs on this spool: start `radflow receive`.", icon=":material/info:"
    )
elif not receiver["accepting"]:
    st.warning(
        f"The DICOM receiver refuses instances now: {receiver['not_accepting_because']}",
        icon=":material/block:",
    )
queues = {k: v for k, v in status.items() if isinstance(v, dict) and k != "champions"}
if queues:
    with st.expander("Queues and counts", expanded=True):
        st.json(queues)

st.subheader("Ingest rate")
rate = pd.DataFrame(hours, columns=["hour", "instances"])
if rate["instances"].sum() == 0:
    st.info(
        f"Nothing received in the last 24 hours: send studies to DICOM port "
        f"{settings.receiver_port} or drop files in `{settings.inbox}`.",
        icon=":material/inbox:",
    )
else:
    st.plotly_chart(
        px.bar(rate, x="hour", y="instances", title="Instances received per hour (UTC)"),
        width="stretch",
    )

st.subheader("Rejected and quarantined inputs")
if not rejected:
    st.caption("No input has been rejected.")
else:
    st.plotly_chart(
        px.bar(
            x=list(by_reason), y=list(by_reason.values()), labels={"x": "reason", "y": "inputs"}
        ),
        width="stretch",
    )
    frame = pd.DataFrame([asdict(r) for r in rejected])
    if not user.can(Permission.VIEW_INPUT_DETAILS):
        frame = frame[["at", "source", "reason"]]
        st.caption("File names and messages can name patients: only admins see them.")
    st.dataframe(text.table(frame), hide_index=True)

st.subheader("Results to PACS")
for column, (status, count) in zip(st.columns(3), outgoing.counts.items(), strict=False):
    column.metric(f"Results {status}", count)
if outgoing.parked:
    st.warning(
        "Parked results stopped trying: fix the cause shown (destination address, AE titles, "
        "the PACS's storage), then re-send them.",
        icon=":material/pause_circle:",
    )
    parked = pd.DataFrame([asdict(p) for p in outgoing.parked])
    chosen = st.dataframe(
        text.table(parked),
        hide_index=True,
        on_select="rerun",
        selection_mode="multi-row",
        key="parked",
    )
    rows = chosen.selection.rows
    if user.can(Permission.RESEND_RESULTS) and st.button(
        f"Re-send {len(rows) or 'all'} parked", icon=":material/send:"
    ):
        ids = [int(i) for i in parked.iloc[rows or slice(None)]["delivery_id"]]
        with context.transaction() as session:
            count = resend_results(session, user, ids)
        st.toast(f"{count} result(s) queued to send again.")
        st.rerun()
if outgoing.unwritten:
    st.caption("Predictions whose SR could not be made")
    st.dataframe(text.table(pd.DataFrame([asdict(u) for u in outgoing.unwritten])), hide_index=True)

st.subheader("Recent flow runs")
try:
    runs = recent_flow_runs(user)
except FlowRunsUnavailable as exc:
    st.info(str(exc), icon=":material/info:")
else:
    if not runs:
        st.caption("The Prefect server has no flow runs yet.")
    else:
        frame = pd.DataFrame([asdict(r) for r in runs])
        failed = frame[frame["state"].isin(["Failed", "Crashed"])]
        if len(failed):
            st.error(f"{len(failed)} of the last {len(frame)} flow runs failed.")
        if not user.can(Permission.VIEW_INPUT_DETAILS):  # failure messages quote inputs
            frame = frame.drop(columns=["message"])
        st.dataframe(text.table(frame), hide_index=True)
