"""Study: the image with window, contrast and AI overlays, the score, the review form, history."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pandas as pd
import streamlit as st
from numpy.typing import NDArray

from dashboard import context, text
from dashboard.viewer import volume_viewer
from dashboard.views import mask_review
from radflow.errors import NotAVolume
from radflow.services.review import (
    ReviewTask,
    Verdict,
    next_unreviewed,
    review_task,
    review_tasks,
    submit_review,
)
from radflow.services.study_view import (
    VOLUME_SUFFIX,
    InstanceRef,
    ObjectNotFound,
    OverlayUnreadable,
    ResultView,
    SeriesView,
    StudyNotFound,
    StudyView,
    adjust_contrast,
    download_result,
    heatmap_overlay,
    load_overlay,
    view_study,
)
from radflow.services.users import Permission, Principal
from radflow.services.volume_view import (
    Layer,
    LayerUnreadable,
    VolumeTooLarge,
    VolumeView,
    preset_window,
    window_presets,
)

user = context.require_page(Permission.VIEW_STUDIES)

VIEWED_KEY = "radflow_viewed"
# Whether a verdict opens the next study: the reader's choice for this browser session. (A
# comment, not a docstring: Streamlit would show a bare string of a page script.)
ADVANCE_KEY = "radflow_advance"


def _back_link() -> None:
    st.page_link(context.WORKLIST_PAGE, label="Back to the worklist", icon=":material/arrow_back:")


def _open(study_uid: str) -> None:
    st.switch_page(context.STUDY_PAGE, query_params={context.STUDY_PARAM: study_uid})


def _load(principal: Principal, study_uid: str) -> StudyView:
    """The view; the first opening in this browser session is audited, redraws are not."""
    viewed: set[str] = st.session_state.setdefault(VIEWED_KEY, set())
    with context.transaction() as session:
        view = view_study(session, principal, study_uid, audit=study_uid not in viewed)
    viewed.add(study_uid)
    return view


def _choose_series(view: StudyView) -> SeriesView | None:
    if len(view.series) > 1:
        return st.selectbox(
            "Series",
            view.series,
            format_func=lambda s: text.plain(
                f"{s.number or '-'}: {s.description or s.modality or s.series_uid}"
            ),
        )
    return view.series[0] if view.series else None


def _picture(
    view: StudyView, series: SeriesView
) -> tuple[NDArray[np.uint8], str, InstanceRef] | None:
    """The series image by image, rendered by the server: a radiograph, or a series that is
    not one volume."""
    """The displayed image (slice, frame, window, contrast), its caption, and which it is."""
    instances = series.instances
    index = len(instances) // 2
    if len(instances) > 1:
        index = (
            st.slider("Slice", 1, len(instances), index + 1, key=f"slice:{series.series_uid}") - 1
        )
    instance = instances[index]
    frame = None
    if instance.frames > 1:
        frame = (
            st.slider(
                "Frame",
                1,
                instance.frames,
                instance.frames // 2 + 1,
                key=f"frame:{instance.object_key}",
            )
            - 1
        )
    controls = st.columns(2)
    presets = window_presets(series.modality or view.modality)
    preset = controls[0].selectbox("Window / level", presets, key="window")
    with controls[1].popover("Contrast", icon=":material/contrast:"):
        brightness = st.slider("Brightness", -0.5, 0.5, 0.0, 0.05, key="brightness")
        contrast = st.slider("Contrast", 0.5, 3.0, 1.0, 0.1, key="contrast")
        invert = st.toggle("Invert", key="invert")
    try:
        image = context.rendered_image(instance.object_key, preset_window(preset or ""), frame)
    except ObjectNotFound:
        st.warning("This image is missing from the object store:")
        st.text(text.plain(instance.object_key))
        return None
    image = adjust_contrast(image, brightness=brightness, contrast=contrast, invert=invert)
    where = [f"slice {index + 1}/{len(instances)}"] if len(instances) > 1 else []
    where += [f"frame {frame + 1}/{instance.frames}"] if frame is not None else []
    caption = " · ".join([series.description or series.series_uid, *where])
    return image, caption, instance


def _with_overlays(
    view: StudyView, image: NDArray[np.uint8], instance: InstanceRef
) -> tuple[NDArray[np.uint8], list[str]]:
    latest = view.latest
    notes: list[str] = []
    if latest is None:
        return image, notes
    store = context.runtime().store
    shown: NDArray[np.uint8] = image
    toggles = st.columns(2)
    if latest.gradcam_key is None:
        toggles[0].caption("No Grad-CAM heat map for this prediction.")
    elif toggles[0].toggle("Grad-CAM heat map", value=True, key="gradcam"):
        opacity = toggles[0].slider("Heat map opacity", 0.0, 1.0, 0.5, 0.05, key="gradcam_opacity")
        try:
            heat = load_overlay(store, latest.gradcam_key, image.shape[:2], instance)
            shown = heatmap_overlay(shown, heat, opacity)
            notes.append(f"Grad-CAM of {latest.model}")
        except (ObjectNotFound, OverlayUnreadable) as exc:
            st.warning(f"The heat map could not be shown: {exc}")
    if latest.mask_key is not None:
        shown, mask_note = mask_review.overlay(toggles[1], latest, shown)
        notes += [mask_note] if mask_note else []
    return shown, notes


def _volume(series: SeriesView) -> tuple[bool, str | None]:
    """Whether the viewer shows the series (then its packing starts now, while the page renders);
    if not, why a series of several images is shown image by image (a single image, a cine,
    need no reason)."""
    if len(series.instances) == 1 and series.instances[0].frames == 1:
        return False, None
    keys = _keys(series)
    try:
        preview = context.volume_preview(series.series_uid, keys)
        packing = context.volume_packing(series.series_uid, keys)
        # No preview: the first view needs the whole series (one multi-frame object). Packed:
        # loading it may have found what the index could not tell.
        if preview is None or packing.done():
            packing.result()
    except (NotAVolume, VolumeTooLarge) as exc:
        return False, f"shown image by image ({exc})" if len(series.instances) > 1 else None
    except ObjectNotFound:
        return False, "shown image by image (an image of the series is missing from the store)"
    return True, None


@st.fragment
def _viewer(view: StudyView, series: SeriesView) -> None:
    """The volume viewer: first a preview (the slice it opens on, small: on the screen within a
    second), then, when the viewer asks for it, the whole series (tens of MB, even when it is
    already packed). The viewer asks as soon as it has the preview, which reruns only this
    fragment, not the page (and a fragment's rerun waits for a page run in progress, never
    interrupts it)."""
    key = f"viewer:{series.series_uid}"
    keys = _keys(series)
    preview = context.volume_preview(series.series_uid, keys)
    packing = context.volume_packing(series.series_uid, keys)
    shown = preview
    if preview is None or st.session_state.get(key) == "whole":
        try:
            shown = packing.result()
        except (VolumeTooLarge, NotAVolume, ObjectNotFound):
            st.rerun(scope="app")  # the page then shows the series image by image, and why
    if shown is None:
        return
    layers, names = _layers(view, series, shown)
    volume_viewer(
        shown,
        layers=layers,
        caption=" · ".join([series.description or series.series_uid, *names]),
        key=key,
    )


def _keys(series: SeriesView) -> tuple[str, ...]:
    return tuple(i.object_key for i in series.instances)


def _layers(
    view: StudyView, series: SeriesView, volume: VolumeView
) -> tuple[list[Layer], list[str]]:
    """The latest prediction's volume maps as the viewer's layers, and what they are."""
    latest = view.latest
    if latest is None:
        return [], []
    layers, notes = [], []
    for kind, key, name in (
        ("heat", latest.gradcam_key, f"Grad-CAM of {latest.model}"),
        ("labels", latest.mask_key, f"Segmentation of {latest.model}"),
    ):
        if key is None or not key.endswith(VOLUME_SUFFIX):
            continue
        try:
            layers.append(context.volume_layer(key, kind, name, _keys(series), volume))
            notes.append(name)
        except (ObjectNotFound, LayerUnreadable) as exc:
            st.warning(f"{name} could not be shown: {exc}")
    if latest.gradcam_key is None:
        text.caption("No Grad-CAM heat map for this prediction.")
    return layers, notes


def _show_image(view: StudyView) -> None:
    """The chosen series in the viewer if it is one volume, else image by image."""
    series = _choose_series(view)
    if series is None or not series.instances:
        st.warning("This study has no stored images.")
        return
    volume, why = _volume(series)
    if volume:
        _viewer(view, series)
        return
    picture = _picture(view, series)
    if picture is None:
        return
    image, caption, instance = picture
    shown, notes = _with_overlays(view, image, instance)
    # Not st.image's caption: that is Markdown, and the series description comes from DICOM.
    st.image(shown, width="stretch")
    text.caption(" · ".join([caption, *notes, *([why] if why else [])]))


def _show_result(view: StudyView) -> None:
    latest = view.latest
    if latest is None:
        st.info(f"Not scored yet (status: {view.status.replace('_', ' ')}).")
    else:
        task = review_task(latest.task)
        columns = st.columns(3)
        columns[0].metric("Score", f"{latest.score:.3f}")
        probability = latest.scores.get(task.positive, latest.score)
        columns[1].metric(f"P({task.positive})", f"{probability:.1%}")
        columns[2].metric("Threshold", f"{latest.threshold:.3f}")
        st.metric("Model", latest.model)
        if latest.provenance:
            st.caption(latest.provenance)
        if latest.flagged:
            st.badge("Above threshold", icon=":material/flag:", color="red")
        else:
            st.badge("Below threshold", icon=":material/check:", color="green")
    if view.not_scored:
        for task, reason in view.not_scored.items():
            text.caption(f"{task}: {reason}")
    elif view.status_reason:
        text.caption(f"Status reason: {view.status_reason}")


def _review_form(principal: Principal, view: StudyView) -> None:
    """Agree (key A), disagree (D) or set the label, for the tasks that apply to the study;
    with "next study after a verdict" on, a verdict opens the next unreviewed study."""
    latest = view.latest
    st.subheader("Review")
    with context.session() as session:
        tasks = review_tasks(session, context.runtime().settings, view.study_uid)
    if not tasks:
        st.caption("No task applies to this study: there is no label to set.")
        return
    task = _choose_task(tasks)
    if task.masks:
        mask_review.form(principal, view, task)
        return
    advance = st.toggle(
        "Next study after a verdict",
        value=st.session_state.get(ADVANCE_KEY, False),
        help="After Agree, Disagree or Set label, open the next unreviewed study",
    )
    st.session_state[ADVANCE_KEY] = advance
    verdicts = latest is not None and latest.task == task.name
    with st.form("review", clear_on_submit=True):
        comment = st.text_area("Comment", max_chars=1024, placeholder="Optional")
        buttons = st.columns(2)
        agree = buttons[0].form_submit_button(
            "Agree",
            icon=":material/thumb_up:",
            type="primary",
            disabled=not verdicts,
            width="stretch",
            shortcut="A",
            help="A",
        )
        disagree = buttons[1].form_submit_button(
            "Disagree",
            icon=":material/thumb_down:",
            disabled=not verdicts,
            width="stretch",
            shortcut="D",
            help="D",
        )
        value = st.selectbox("Or set the label", list(task.labels), key="review_label")
        set_label = st.form_submit_button("Set label", icon=":material/label:", width="stretch")
    verdict = (
        Verdict.AGREE
        if agree
        else Verdict.DISAGREE
        if disagree
        else Verdict.LABEL
        if set_label
        else None
    )
    if verdict is None:
        return
    with context.transaction() as session:
        result = submit_review(
            session,
            principal,
            view.study_uid,
            verdict,
            task=task.name,
            value=value,
            comment=comment,
        )
    context.saved(
        result.task, f"Saved: {result.task} = {result.value} ({result.verdict})", rerun=not advance
    )
    if advance and not _next_study(view.study_uid):
        st.session_state[context.SAVED_KEY] += ". Every scored study has been reviewed."
        st.rerun()


def _choose_task(tasks: list[ReviewTask]) -> ReviewTask:
    if len(tasks) == 1:
        return tasks[0]
    name = st.selectbox("Task", [t.name for t in tasks], key="review_task")
    return next((t for t in tasks if t.name == name), tasks[0])


def _next_study(study_uid: str) -> bool:
    """Open the most urgent unreviewed study after this one; False if there is none."""
    with context.session() as session:
        upcoming = next_unreviewed(session, after=study_uid)
    if upcoming is None:
        return False
    _open(upcoming)
    return True


uid = st.query_params.get(context.STUDY_PARAM)
if not uid:
    st.title("Study")
    st.info("No study selected: pick one on the worklist.")
    _back_link()
    st.stop()

try:
    view = _load(user, uid)
except StudyNotFound:
    st.title("Study")
    # The UID comes from the URL: shown as plain text, never inside the (Markdown) alert.
    st.error("No study has this Study Instance UID; it may not have been received yet.")
    st.text(text.plain(uid[:128]))
    _back_link()
    st.stop()

top = st.columns([3, 1], vertical_alignment="center")
with top[0]:
    _back_link()
if (
    user.can(Permission.REVIEW)
    and top[1].button("Next unreviewed", icon=":material/skip_next:", shortcut="N", help="N")
    and not _next_study(view.study_uid)
):
    st.toast("Every scored study has been reviewed.")

text.title(f"Study {view.accession or view.study_uid}")
text.caption(
    f"Patient {view.patient} · {view.modality or 'unknown modality'} · status "
    f"{view.status.replace('_', ' ')} · received {view.received_at:%Y-%m-%d %H:%M} · "
    f"UID {view.study_uid}"
)
saved = st.session_state.pop(context.SAVED_KEY, None)
if saved:
    st.success(saved, icon=":material/check_circle:")

image_column, result_column = st.columns([3, 2], gap="large")
with image_column:
    _show_image(view)
with result_column:
    _show_result(view)
    if user.can(Permission.REVIEW):
        _review_form(user, view)

st.subheader("Prediction history")
if view.predictions:
    st.dataframe(
        text.table(
            pd.DataFrame(
                [
                    {k: v for k, v in asdict(p).items() if k not in ("scores", "derived_keys")}
                    for p in view.predictions
                ]
            )
        ),
        column_order=[
            "created_at",
            "model",
            "runtime",
            "score",
            "threshold",
            "flagged",
            "latency_ms",
        ],
        column_config={
            "created_at": st.column_config.DatetimeColumn("Scored", format="YYYY-MM-DD HH:mm:ss"),
            "model": "Model",
            "runtime": "Runtime",
            "score": st.column_config.NumberColumn("Score", format="%.3f"),
            "threshold": st.column_config.NumberColumn("Threshold", format="%.3f"),
            "flagged": st.column_config.CheckboxColumn("Flagged"),
            "latency_ms": st.column_config.NumberColumn("Latency (ms)", format="%.1f"),
        },
        hide_index=True,
    )
else:
    st.caption("No predictions.")


def _results(principal: Principal, view: StudyView) -> None:
    """The DICOM results (SR, SEG), each downloadable (audited), and where each was sent."""
    st.subheader("DICOM results")
    for reason in view.unreported:
        st.warning("An SR could not be made:", icon=":material/report:")
        st.text(text.plain(reason))
    if not view.results:
        st.caption("No SR or SEG made for this study yet.")
        return
    for index, result in enumerate(view.results):
        columns = st.columns([3, 1], vertical_alignment="center")
        columns[0].write(
            f"**{result.kind}** of {result.model} · {result.created_at:%Y-%m-%d %H:%M}"
        )
        columns[1].download_button(
            "Download",
            data=lambda result=result: _download(principal, view.study_uid, result),
            file_name=result.file_name,
            mime="application/dicom",
            icon=":material/download:",
            key=f"result:{index}",
            on_click="ignore",
        )
        sent = [delivery.describe() for delivery in result.deliveries]
        with columns[0]:  # a peer's error message is not Markdown either
            for line in sent or ["Sent to no destination (the routing rule names none)."]:
                text.caption(line)


def _download(principal: Principal, study_uid: str, result: ResultView) -> bytes:
    with context.transaction() as session:
        return download_result(
            session, context.runtime().store, principal, study_uid, result.object_key
        )


_results(user, view)

st.subheader("Series")
st.dataframe(
    text.table(
        pd.DataFrame(
            [{k: v for k, v in asdict(s).items() if k != "instances"} for s in view.series]
        )
    ),
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
