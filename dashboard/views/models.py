"""Models: versions per task, how well they do on labelled studies, their runtime variants
(size, speed, metric delta), promotion, serving and retraining."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st
from sqlalchemy.orm import Session

from dashboard import context
from flows.launcher import start_training
from radflow.errors import RadflowError
from radflow.services.models import (
    Evaluation,
    VersionSummary,
    against_decision,
    evaluate,
    labels_since_training,
    list_versions,
    promote,
    request_retrain,
    rollback,
    rollback_serving,
    serve,
)
from radflow.services.users import Permission, Principal

user = context.require_page(Permission.VIEW_MODELS)
METRICS = ("auc", "accuracy", "sensitivity", "specificity", "threshold", "n")


def _versions_table(versions: list[VersionSummary]) -> None:
    rows = [
        {
            "model": v.name,
            "status": v.status,
            **{m: v.metrics.get(m) for m in METRICS},
            "labels": v.label_snapshot,
            "serving": v.serving,
            "created_at": v.created_at,
        }
        for v in versions
    ]
    st.dataframe(
        pd.DataFrame(rows),
        hide_index=True,
        column_config={
            "model": "Version",
            "status": "Status",
            "auc": st.column_config.NumberColumn("Val AUC", format="%.3f"),
            "accuracy": st.column_config.NumberColumn("Accuracy", format="%.3f"),
            "sensitivity": st.column_config.NumberColumn("Sensitivity", format="%.3f"),
            "specificity": st.column_config.NumberColumn("Specificity", format="%.3f"),
            "threshold": st.column_config.NumberColumn("Threshold", format="%.3f"),
            "n": st.column_config.NumberColumn("Val n", format="%d"),
            "labels": st.column_config.NumberColumn("Label snapshot", help="Labels trained on"),
            "serving": st.column_config.TextColumn(
                "Runtime", help="What scores for the version while it is the champion"
            ),
            "created_at": st.column_config.DatetimeColumn("Created", format="YYYY-MM-DD HH:mm"),
        },
    )


def _variants_table(version: VersionSummary) -> None:
    if not version.variants:
        st.caption(
            f"{version.name} has no runtime variants: `radflow model compress "
            f"{version.task} {version.version}` makes and judges ONNX fp32 and int8 ones."
        )
        return
    rows = [
        {
            "runtime": v.runtime,
            "size_mb": v.size_mb,
            "images_per_second": v.images_per_second,
            "speedup": v.speedup,
            "auc": v.auc,
            "auc_delta": v.auc_delta,
            "check": "serving" if v.serving else ("passed" if v.passed else "refused"),
            "reason": v.reason,
        }
        for v in version.variants
    ]
    st.subheader("Runtime variants", help="Measured on the task's evaluation set")
    st.dataframe(
        pd.DataFrame(rows),
        hide_index=True,
        column_config={
            "runtime": "Runtime",
            "size_mb": st.column_config.NumberColumn("Size (MB)", format="%.2f"),
            "images_per_second": st.column_config.NumberColumn("Images/s", format="%.0f"),
            "speedup": st.column_config.NumberColumn("Speed-up", format="%.2fx"),
            "auc": st.column_config.NumberColumn("AUC", format="%.4f"),
            "auc_delta": st.column_config.NumberColumn("AUC delta", format="%+.4f"),
            "check": "Non-inferiority",
            "reason": "Why",
        },
    )


def _training_curves(version: VersionSummary) -> None:
    if not version.history:
        st.caption("No training history was recorded for this version.")
        return
    frame = pd.DataFrame(version.history)
    if "epoch" not in frame:
        frame["epoch"] = range(1, len(frame) + 1)
    series = [c for c in frame.columns if c != "epoch" and pd.api.types.is_numeric_dtype(frame[c])]
    long = frame.melt(id_vars="epoch", value_vars=series, var_name="curve", value_name="value")
    figure = px.line(long, x="epoch", y="value", color="curve", markers=True, title="Training")
    st.plotly_chart(figure, width="stretch")


def _evaluation_charts(version: VersionSummary, evaluation: Evaluation | None) -> None:
    if evaluation is None:
        st.info(
            f"{version.name} has not scored any labelled study yet: ROC, confusion matrix and "
            "calibration appear once studies it scored are reviewed.",
            icon=":material/query_stats:",
        )
        return
    source = (
        "labels it was not trained on" if evaluation.held_out else "all labels (incl. training)"
    )
    st.caption(f"From {evaluation.n} labelled studies it scored, using {source}.")
    columns = st.columns(3)
    roc = go.Figure()
    roc.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot"}, name="chance")
    if evaluation.fpr:
        roc.add_scatter(x=evaluation.fpr, y=evaluation.tpr, mode="lines", name=version.name)
    auc = f"AUC {evaluation.auc:.3f}" if evaluation.auc is not None else "one class only"
    roc.update_layout(
        title=f"ROC ({auc})", xaxis_title="1 - specificity", yaxis_title="sensitivity"
    )
    columns[0].plotly_chart(roc, width="stretch")
    c = evaluation.confusion
    matrix = px.imshow(
        [[c["tp"], c["fn"]], [c["fp"], c["tn"]]],
        x=["flagged", "not flagged"],
        y=["positive", "negative"],
        text_auto=True,
        color_continuous_scale="Blues",
        title=f"At threshold {version.threshold:.3f}",
    )
    matrix.update_layout(coloraxis_showscale=False)
    columns[1].plotly_chart(matrix, width="stretch")
    calibration = go.Figure()
    calibration.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot"}, name="ideal")
    calibration.add_scatter(
        x=[p for p, _, _ in evaluation.calibration],
        y=[o for _, o, _ in evaluation.calibration],
        mode="lines+markers",
        text=[f"{n} studies" for _, _, n in evaluation.calibration],
        name=version.name,
    )
    calibration.update_layout(
        title="Calibration", xaxis_title="mean predicted", yaxis_title="observed positive"
    )
    columns[2].plotly_chart(calibration, width="stretch")


def _actions(principal: Principal, task: str, versions: list[VersionSummary]) -> None:
    left, right = st.columns(2)
    with left:
        chosen = st.selectbox(
            "Version", versions, format_func=lambda v: f"{v.name} ({v.status})", key=f"pick:{task}"
        )
        promotable = chosen is not None and chosen.status != "champion"
        reason = None
        if promotable:
            assert chosen is not None
            with context.session() as session:
                against = against_decision(session, task, chosen.version)
            if against is not None:
                st.warning(
                    f"{chosen.name} did not beat the champion in its DeLong test "
                    f"(p = {against[0]:.3g} ≥ α = {against[1]:g}). Promoting it anyway needs "
                    "a reason, recorded in the audit trail.",
                    icon=":material/warning:",
                )
                reason = st.text_input("Reason for promoting it anyway", key=f"reason:{task}")
        if promotable and st.button("Promote to champion", key=f"promote:{task}", type="primary"):
            assert chosen is not None
            _run(
                lambda s: promote(s, principal, task, chosen.version, reason),
                f"Promoted {chosen.name}",
            )
        if any(v.status == "champion" for v in versions) and st.button(
            "Roll back to the previous champion", key=f"rollback:{task}"
        ):
            _run(lambda s: rollback(s, principal, task), "Rolled back")
        _serving_actions(principal, task, chosen)
    with right:
        with context.session() as session:
            new_labels = labels_since_training(session, task)
        st.metric("Labels since last training", new_labels)
        if st.button("Retrain now", key=f"retrain:{task}", icon=":material/model_training:"):
            with context.transaction() as session:
                request_retrain(session, principal, task)
            started = start_training(context.runtime().settings, task)
            where = "Prefect flow run" if started.how == "deployment" else "local process"
            st.success(f"Training of {task} started ({where} {started.ref}).")


def _serving_actions(principal: Principal, task: str, chosen: VersionSummary | None) -> None:
    if chosen is None:
        return
    servable = list(
        dict.fromkeys(["torch-fp32", *(v.runtime for v in chosen.variants if v.passed)])
    )
    runtime = st.selectbox(
        "Runtime",
        servable,
        index=servable.index(chosen.serving) if chosen.serving in servable else 0,
        key=f"runtime:{task}",
        help="Only variants that passed their non-inferiority check are offered",
    )
    if runtime != chosen.serving and st.button(
        f"Serve {chosen.name} with {runtime}", key=f"serve:{task}"
    ):
        _run(
            lambda s: serve(s, principal, task, chosen.version, runtime),
            f"{chosen.name} serves {runtime}",
        )
    if st.button("Roll back the runtime", key=f"rollback-serving:{task}"):
        _run(lambda s: rollback_serving(s, principal, task), "Runtime rolled back")


def _run(action: Callable[[Session], object], done: str) -> None:
    try:
        with context.transaction() as session:
            action(session)
    except RadflowError as exc:
        st.error(str(exc))
        return
    st.toast(done)
    st.rerun()


st.title("Models")
with context.session() as session:
    tasks = list_versions(session, user)
if not tasks:
    st.info(
        "No model versions yet: label studies on the worklist (or `radflow label`), then "
        "press Retrain or run `radflow train`.",
        icon=":material/model_training:",
    )
    st.stop()

for task, versions in tasks.items():
    st.header(task)
    _versions_table(versions)
    shown = st.selectbox(
        "Show charts for", versions, format_func=lambda v: v.name, key=f"charts:{task}"
    )
    if shown is not None:
        with context.session() as session:
            evaluation = evaluate(session, user, shown.id)
        _evaluation_charts(shown, evaluation)
        _variants_table(shown)
        _training_curves(shown)
    if user.can(Permission.PROMOTE):
        _actions(user, task, versions)
