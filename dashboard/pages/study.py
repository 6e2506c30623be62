"""Study: the image, the latest score against its threshold, prediction history and series."""

from __future__ import annotations

from dataclasses import asdict

import pandas as pd
import streamlit as st

from dashboard import context
from radflow.services.study_view import StudyNotFound, StudyView, Window, get_study_view
from radflow.store import ObjectNotFound

# Common CT windows as (center, width) in HU; other modalities use the window in the file.
CT_WINDOWS: dict[str, Window | None] = {
    "From the image": None,
    "Lung": (-600.0, 1500.0),
    "Mediastinum": (50.0, 350.0),
    "Bone": (400.0, 1800.0),
    "Brain": (40.0, 80.0),
}


def _back_link() -> None:
    st.page_link(context.WORKLIST_PAGE, label="Back to the worklist", icon=":material/arrow_back:")


def _show_image(view: StudyView) -> None:
    series = view.series
    if len(series) > 1:
        chosen = st.selectbox(
            "Series",
            series,
            format_func=lambda s: (
                f"{s.number or '-'}: {s.description or s.modality or s.series_uid}"
            ),
        )
    else:
        chosen = series[0] if series else None
    if chosen is None or chosen.preview_key is None:
        st.warning("This study has no stored images.")
        return
    window = None
    if view.modality == "CT":
        window = CT_WINDOWS[st.selectbox("Window", list(CT_WINDOWS)) or "From the image"]
    try:
        image = context.rendered_image(chosen.preview_key, window)
    except ObjectNotFound:
        st.warning(f"The image {chosen.preview_key} is missing from the object store.")
        return
    st.image(image, caption=chosen.description or chosen.series_uid, width="stretch")


def _show_result(view: StudyView) -> None:
    latest = view.latest
    if latest is None:
        st.info(f"Not scored yet (status: {view.status}).")
    else:
        st.metric("Score", f"{latest.score:.3f}")
        st.metric("Threshold", f"{latest.threshold:.3f}")
        st.metric("Model", latest.model)
        if latest.flagged:
            st.badge("Above threshold", icon=":material/flag:", color="red")
        else:
            st.badge("Below threshold", icon=":material/check:", color="green")
    if view.status_reason:
        st.caption(f"Status reason: {view.status_reason}")


uid = st.query_params.get(context.STUDY_PARAM)
if not uid:
    st.title("Study")
    st.info("No study selected: pick one on the worklist.")
    _back_link()
    st.stop()

try:
    with context.session() as session:
        view = get_study_view(session, uid)
except StudyNotFound as exc:
    st.title("Study")
    st.error(str(exc))
    _back_link()
    st.stop()

_back_link()
st.title(f"Study {view.accession or view.study_uid}")
st.caption(
    f"Patient {view.patient} · {view.modality or 'unknown modality'} · status {view.status} · "
    f"received {view.received_at:%Y-%m-%d %H:%M} · UID {view.study_uid}"
)

image_column, result_column = st.columns([3, 2], gap="large")
with image_column:
    _show_image(view)
with result_column:
    _show_result(view)

st.subheader("Prediction history")
if view.predictions:
    st.dataframe(
        pd.DataFrame([asdict(p) for p in view.predictions]),
        column_order=["created_at", "model", "score", "threshold", "flagged", "latency_ms"],
        column_config={
            "created_at": st.column_config.DatetimeColumn("Scored", format="YYYY-MM-DD HH:mm:ss"),
            "model": "Model",
            "score": st.column_config.NumberColumn("Score", format="%.3f"),
            "threshold": st.column_config.NumberColumn("Threshold", format="%.3f"),
            "flagged": st.column_config.CheckboxColumn("Flagged"),
            "latency_ms": st.column_config.NumberColumn("Latency (ms)", format="%.1f"),
        },
        hide_index=True,
    )
else:
    st.caption("No predictions.")

st.subheader("Series")
st.dataframe(
    pd.DataFrame([asdict(s) for s in view.series]),
    column_order=["number", "modality", "description", "body_part", "instance_count", "series_uid"],
    column_config={
        "number": "Number",
        "modality": "Modality",
        "description": "Description",
        "body_part": "Body part",
        "instance_count": "Instances",
        "series_uid": "Series UID",
    },
    hide_index=True,
)
