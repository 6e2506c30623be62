"""The study page's part for segmentations (called from study.py, not a page of its own): the
predicted mask over the image, and the reviewer's verdict on it (radflow.services.mask_review).
"""

from __future__ import annotations

import math

import numpy as np
import streamlit as st
from numpy.typing import NDArray
from streamlit.delta_generator import DeltaGenerator

from dashboard import context, text
from radflow.services.mask_review import (
    MaskError,
    MaskUpload,
    MaskVerdict,
    predicted_mask,
    review_mask,
)
from radflow.services.review import MAX_COMMENT, ReviewTask
from radflow.services.study_view import (
    ObjectNotFound,
    OverlayUnreadable,
    PredictionView,
    StudyView,
    mask_overlay,
)
from radflow.services.users import Principal

STYLES = ("Fill", "Contour")


def overlay(
    column: DeltaGenerator, prediction: PredictionView, image: NDArray[np.uint8]
) -> tuple[NDArray[np.uint8], str | None]:
    """``image`` with the prediction's mask (at its model's threshold) drawn as the reviewer
    chooses, and what the caption says of it (None when it is not drawn)."""
    if not column.toggle("Predicted mask", value=True, key="mask"):
        return image, None
    style = column.radio("Mask style", STYLES, horizontal=True, key="mask_style")
    opacity = column.slider("Mask opacity", 0.0, 1.0, 0.4, 0.05, key="mask_opacity")
    try:
        mask = predicted_mask(context.runtime().store, prediction)
    except (ObjectNotFound, OverlayUnreadable) as exc:
        st.warning("The mask could not be shown:")
        st.text(text.plain(exc))
        return image, None
    if mask.shape != image.shape[:2]:
        column.caption("The predicted mask lies over another image of this study.")
        return image, None
    drawn = mask_overlay(image, mask, opacity, contour=style == "Contour")
    return drawn, f"mask of {prediction.model} at threshold {prediction.threshold:.3f}"


def form(principal: Principal, view: StudyView, task: ReviewTask) -> None:
    """Accept or reject the predicted mask, or upload a corrected one (PNG, NIfTI, DICOM SEG)."""
    latest = view.latest
    predicted = latest is not None and latest.task == task.name and latest.mask_key is not None
    runtime = context.runtime()
    with st.form("mask_review", clear_on_submit=True):
        comment = st.text_area("Comment", max_chars=MAX_COMMENT, placeholder="Optional")
        buttons = st.columns(2)
        accept = buttons[0].form_submit_button(
            "Accept mask",
            icon=":material/thumb_up:",
            type="primary",
            disabled=not predicted,
            width="stretch",
        )
        reject = buttons[1].form_submit_button(
            "Reject mask", icon=":material/thumb_down:", disabled=not predicted, width="stretch"
        )
        upload = st.file_uploader(
            "Or upload a corrected mask: PNG, NIfTI or DICOM SEG",
            max_upload_size=math.ceil(runtime.settings.mask_upload_max_bytes / 2**20),
            key="mask_file",
        )
        empty = st.checkbox(f"The image shows no {task.positive}: the mask may be empty")
        correct = st.form_submit_button(
            "Store the corrected mask", icon=":material/upload:", width="stretch"
        )
    verdict = (
        MaskVerdict.ACCEPT
        if accept
        else MaskVerdict.REJECT
        if reject
        else MaskVerdict.CORRECT
        if correct
        else None
    )
    if verdict is None:
        return
    file = MaskUpload(upload.name, upload.getvalue()) if upload is not None else None
    try:
        with context.transaction() as session:
            result = review_mask(
                session,
                runtime.store,
                runtime.settings,
                principal,
                view.study_uid,
                task.name,
                verdict,
                upload=file,
                confirm_empty=empty,
                comment=comment,
            )
    except MaskError as exc:
        # Radflow's words in the alert; the reason names the file, so it is shown as plain text.
        st.error(f"The mask was not stored ({exc.reason}); the study's label is unchanged.")
        st.text(text.plain(exc))
        return
    context.saved(result.task, result.describe(), labelled=result.label_id is not None)
