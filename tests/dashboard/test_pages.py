"""The dashboard pages under Streamlit's AppTest, on a seeded SQLite data dir.

The app reads ``Settings()`` from the environment, as it does when served, so each test points
``RADFLOW_DATA_DIR`` at its own folder and clears Streamlit's caches (they outlive one AppTest).
Most tests start logged in (session state set as the login page sets it); the login tests go
through the form.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from factories import (
    PASSWORD,
    add_prediction,
    add_variant,
    make_model_version,
    make_study,
    make_user,
)
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from dashboard.context import AUTH_KEY
from flows import launcher
from radflow.db import (
    AuditEvent,
    Label,
    ModelStatus,
    ModelVersion,
    Study,
    StudyStatus,
    TrainingRun,
    VariantRuntime,
    unit_of_work,
)
from radflow.learning.labels import add_label
from radflow.runtime import Runtime
from radflow.services.users import Role
from radflow.settings import Settings

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
USERS = {Role.RADIOLOGIST: "rita", Role.ML_ENGINEER: "max", Role.ADMIN: "ada"}


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    """A migrated SQLite data dir with one user per role, found by the app through the env."""
    for name in list(os.environ):
        if name.upper().startswith("RADFLOW_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("RADFLOW_DATA_DIR", str(tmp_path / "data"))
    st.cache_resource.clear()
    st.cache_data.clear()
    with Runtime.open(Settings()) as rt:
        with unit_of_work(rt.session_factory) as session:
            for role, name in USERS.items():
                make_user(session, name, role)
        yield rt
    st.cache_resource.clear()
    st.cache_data.clear()


def seed(runtime: Runtime, *scored: tuple[str, float | None]) -> dict[str, str]:
    """Studies by accession and score (with heat maps); returns accession -> Study UID."""
    with unit_of_work(runtime.session_factory) as session:
        studies = {
            a: make_study(session, runtime.store, accession=a, score=s, gradcam=s is not None)
            for a, s in scored
        }
        return {accession: study.study_uid for accession, study in studies.items()}


def app(role: Role | None = Role.RADIOLOGIST) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60)
    if role is not None:
        at.session_state[AUTH_KEY] = {"name": USERS[role], "seen": time.monotonic()}
    return at


def study_page(uid: str, role: Role = Role.RADIOLOGIST) -> AppTest:
    at = app(role)
    at.query_params["study"] = uid
    at.switch_page("views/study.py")
    return at.run()


def events(runtime: Runtime, action: str) -> list[tuple[str, str]]:
    with runtime.session_factory() as session:
        rows = session.execute(
            select(AuditEvent.actor, AuditEvent.object_id).where(AuditEvent.action == action)
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


def test_nothing_but_the_login_page_without_a_login(runtime: Runtime) -> None:
    seed(runtime, ("HIGH", 0.91))
    at = app(role=None).run()
    assert not at.exception
    assert at.title[0].value == "Radflow"
    assert not at.dataframe
    # The server does not even know the other pages before a login.
    with pytest.raises(ValueError, match=r"Known pages: \['[^,]*login.py'\]"):
        at.switch_page("views/worklist.py")


def test_login_with_the_right_password_opens_the_worklist(runtime: Runtime) -> None:
    seed(runtime, ("HIGH", 0.91))
    at = app(role=None).run()
    at.text_input[0].input("rita")
    at.text_input[1].input("wrong password")
    at.button[0].click().run()
    assert "wrong user name or password" in at.error[0].value
    at.text_input[0].input("rita")
    at.text_input[1].input(PASSWORD)
    at.button[0].click().run()
    assert not at.exception
    assert at.title[0].value == "Worklist"
    assert events(runtime, "login") == [("rita", "rita")]
    assert events(runtime, "login-failed") == [("rita", "rita")]


def test_idle_sessions_must_log_in_again(runtime: Runtime) -> None:
    at = app()
    idle_s = runtime.settings.session_idle_minutes * 60
    at.session_state[AUTH_KEY] = {"name": "rita", "seen": time.monotonic() - idle_s - 1}
    at.run()
    assert at.title[0].value == "Radflow"
    assert "idle too long" in at.info[0].value


def test_worklist_in_triage_order_with_counts(runtime: Runtime) -> None:
    seed(runtime, ("LOW", 0.12), ("HIGH", 0.91), ("NONE", None))
    at = app().run()
    assert not at.exception
    table = at.dataframe[0].value
    assert table["accession"].tolist() == ["HIGH", "LOW", "NONE"]
    assert table["score"].tolist()[:2] == pytest.approx([0.91, 0.12])
    assert table["model"].tolist()[:2] == ["pneumonia-cxr:v1", "pneumonia-cxr:v1"]
    assert table["flagged"].tolist()[:2] == [True, False]
    metrics = {m.label: m.value for m in at.metric}
    assert (metrics["Scored"], metrics["Stable"], metrics["Failed"]) == ("2", "1", "0")


def test_empty_worklist_says_how_to_add_studies(runtime: Runtime) -> None:
    at = app().run()
    assert not at.exception
    message = at.info[0].value
    assert "No studies yet" in message
    assert f"port {runtime.settings.receiver_port}" in message
    assert str(runtime.settings.inbox) in message
    assert not at.dataframe


def test_filters_and_search_change_the_table(runtime: Runtime) -> None:
    seed(runtime, ("FIRST", 0.3), ("SECOND", 0.8))
    with unit_of_work(runtime.session_factory) as session:
        make_study(
            session,
            runtime.store,
            accession="BROKEN",
            status=StudyStatus.FAILED,
            status_reason="preprocessing: no pixel data",
        )
    at = app().run()
    assert at.dataframe[0].value["accession"].tolist() == ["SECOND", "FIRST", "BROKEN"]
    at.selectbox(key="sort").set_value("Oldest first").run()
    assert at.dataframe[0].value["accession"].tolist() == ["FIRST", "SECOND", "BROKEN"]
    at.selectbox(key="status").set_value("failed").run()
    table = at.dataframe[0].value
    assert table["accession"].tolist() == ["BROKEN"]
    assert table["status_reason"].tolist() == ["preprocessing: no pixel data"]
    at.selectbox(key="status").set_value("all").run()
    at.text_input(key="search").input("SEC").run()
    assert at.dataframe[0].value["accession"].tolist() == ["SECOND"]


def test_pagination_walks_through_the_studies(runtime: Runtime) -> None:
    seed(runtime, *[(f"S{i:02d}", i / 100) for i in range(30)])
    at = app().run()
    at.selectbox(key="sort").set_value("Highest score first").run()
    at.selectbox(key="size").set_value(25).run()
    assert len(at.dataframe[0].value) == 25
    assert at.dataframe[0].value["accession"].iloc[0] == "S29"
    assert at.pagination[0].num_pages == 2
    at.pagination[0].set_value(2).run()
    assert at.dataframe[0].value["accession"].tolist() == ["S04", "S03", "S02", "S01", "S00"]
    assert "Studies 26–30 of 30" in at.caption[0].value


def test_selecting_a_row_opens_the_study_and_audits_the_view(runtime: Runtime) -> None:
    uids = seed(runtime, ("LOW", 0.12), ("HIGH", 0.91))
    at = app().run()
    at.session_state["worklist_table"] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    assert not at.exception
    assert at.query_params["study"] == uids["HIGH"]
    assert at.title[0].value == "Study HIGH"
    at.run()  # a redraw is not another view
    assert events(runtime, "view") == [("rita", uids["HIGH"])]


def test_study_page_shows_image_heat_map_score_and_model(runtime: Runtime) -> None:
    uids = seed(runtime, ("HIGH", 0.91))
    at = study_page(uids["HIGH"])
    assert not at.exception
    assert at.title[0].value == "Study HIGH"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics == {
        "Score": "0.910",
        "P(pneumonia)": "91.0%",
        "Threshold": "0.500",
        "Model": "pneumonia-cxr:v1",
    }
    assert len(at.image) == 1
    assert "Grad-CAM of pneumonia-cxr:v1" in at.image[0].captions[0]
    at.toggle(key="gradcam").set_value(False).run()
    assert "Grad-CAM" not in at.image[0].captions[0]
    history = at.dataframe[0].value
    assert history["model"].tolist() == ["pneumonia-cxr:v1"]


def test_study_without_heat_map_says_so(runtime: Runtime) -> None:
    with unit_of_work(runtime.session_factory) as session:
        uid = make_study(session, runtime.store, accession="PLAIN", score=0.4).study_uid
    at = study_page(uid)
    assert not at.exception
    assert any("No Grad-CAM heat map" in c.value for c in at.caption)
    assert len(at.image) == 1


def test_window_presets_and_frame_slider(runtime: Runtime) -> None:
    frames = np.stack([np.full((32, 32), v, dtype=np.uint16) for v in (0, 1000, 2000)])
    frames[:, 0, 0] = 4000
    with unit_of_work(runtime.session_factory) as session:
        ct = make_study(
            session, runtime.store, accession="CT1", modality="CT", rescale=(1.0, -1024.0)
        )
        cine = make_study(session, runtime.store, accession="CINE", pixels=frames)
    at = study_page(ct.study_uid)
    before = at.image[0].value
    at.selectbox(key="window").set_value("Lung").run()
    assert not at.exception
    assert at.image[0].value != before
    at = study_page(cine.study_uid)
    slider = at.slider(key=next(k for k in at.session_state if str(k).startswith("frame:")))
    assert slider.value == 2
    slider.set_value(1).run()
    assert not at.exception
    assert "frame 1/3" in at.image[0].captions[0]


def test_agree_writes_a_review_label_and_audit_event(runtime: Runtime) -> None:
    uids = seed(runtime, ("HIGH", 0.91), ("NEXT", 0.7))
    at = study_page(uids["HIGH"])
    at.text_area[0].input("consolidation right lower lobe")
    next(b for b in at.button if b.label == "Agree").click().run()
    assert not at.exception
    with runtime.session_factory() as session:
        label = session.scalars(select(Label)).one()
    assert (label.value, label.source, label.author) == ("pneumonia", "review", "rita")
    assert label.comment == "consolidation right lower lobe"
    assert events(runtime, "review") == [("rita", uids["HIGH"])]
    assert "Saved: pneumonia-cxr = pneumonia" in at.success[0].value
    next(b for b in at.button if b.label == "Next unreviewed").click().run()
    assert at.title[0].value == "Study NEXT"


def labelled(runtime: Runtime, labels: int, unlabelled: int) -> list[str]:
    """Studies with noise images, the first ``labels`` labelled by an import (both classes);
    returns the Study UIDs of the unlabelled ones."""
    rng = np.random.default_rng(7)
    with unit_of_work(runtime.session_factory) as session:
        studies = [
            make_study(session, runtime.store, pixels=rng.integers(0, 4096, (64, 64)))
            for _ in range(labels + unlabelled)
        ]
        for i, study in enumerate(studies[:labels]):
            value = "pneumonia" if i % 2 else "normal"
            add_label(session, study.study_uid, "pneumonia-cxr", value, source="import", author="t")
        return [s.study_uid for s in studies[labels:]]


@pytest.fixture
def embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded default: no Prefect server (the flow tests' harness may be running in this
    test session, and it sets the process-wide Prefect API URL)."""
    monkeypatch.setattr(launcher, "orchestrated", lambda: False)


def set_label(uid: str, value: str) -> AppTest:
    at = study_page(uid)
    at.selectbox(key="review_label").set_value(value)
    next(b for b in at.button if b.label == "Set label").click().run()
    assert not at.exception
    return at


def test_a_review_below_the_retrain_threshold_starts_no_training(
    runtime: Runtime, embedded: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RADFLOW_RETRAIN_AFTER_LABELS", "22")
    (uid,) = labelled(runtime, 20, 1)
    at = set_label(uid, "pneumonia")
    assert at.success[0].value == "Saved: pneumonia-cxr = pneumonia (label)"
    assert not (runtime.settings.data_dir / "logs").exists()
    with runtime.session_factory() as session:
        assert session.scalars(select(TrainingRun)).all() == []


def test_the_review_that_makes_a_task_due_starts_a_background_retrain(
    runtime: Runtime, embedded: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the embedded default the dashboard starts `radflow retrain --if-due` in the background
    (the page returns at once) and that process trains on every label, the review included."""
    monkeypatch.setenv("RADFLOW_RETRAIN_AFTER_LABELS", "21")
    (uid,) = labelled(runtime, 20, 1)
    started = time.monotonic()
    at = set_label(uid, "pneumonia")
    assert time.monotonic() - started < 30  # the page did not train
    message = at.success[0].value
    assert message.startswith("Saved: pneumonia-cxr = pneumonia (label). Enough new labels")
    pid = int(message.rsplit("(process ", 1)[1].rstrip(").").strip())

    # The dashboard's reaper thread collects the child's exit status, so wait for it to vanish
    # (os.waitpid here would race that thread) and judge the outcome by the log and the database.
    wait_until_gone(pid, timeout=300)
    log = (runtime.settings.data_dir / "logs" / "retrain-pneumonia-cxr.log").read_text()
    assert "Traceback" not in log, log
    with runtime.session_factory() as session:
        (run,) = session.scalars(select(TrainingRun)).all()
        version = session.scalars(select(ModelVersion)).one()
    assert (run.status, len(run.label_ids)) == ("completed", 21)
    assert (version.version, version.status) == (1, ModelStatus.CHAMPION)


def wait_until_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise AssertionError(f"process {pid} still running after {timeout} s")


def test_ml_engineer_promotes_but_cannot_review(runtime: Runtime) -> None:
    uids = seed(runtime, ("HIGH", 0.91))
    with unit_of_work(runtime.session_factory) as session:
        make_model_version(session, version=2)
    at = study_page(uids["HIGH"], Role.ML_ENGINEER)
    assert not any(b.label == "Agree" for b in at.button)
    at.switch_page("views/models.py").run()
    assert not at.exception
    assert at.title[0].value == "Models"
    at.selectbox(key="pick:pneumonia-cxr").set_value(
        next(o for o in at.selectbox(key="pick:pneumonia-cxr").options if "v2" in o)
    )
    at.run()
    at.button(key="promote:pneumonia-cxr").click().run()
    assert not at.exception
    with runtime.session_factory() as session:
        statuses = dict(session.execute(select(ModelVersion.version, ModelVersion.status)).all())
    assert statuses[2] == ModelStatus.CHAMPION
    assert events(runtime, "promote") == [("max", "pneumonia-cxr:v2")]


def test_ml_engineer_serves_a_variant_and_the_study_page_names_it(runtime: Runtime) -> None:
    uids = seed(runtime, ("HIGH", 0.91))
    with unit_of_work(runtime.session_factory) as session:
        v1 = make_model_version(session, version=1)
        add_variant(session, v1, "torch-fp32")
        add_variant(session, v1, "onnx-int8", auc_delta=-0.002, images_per_second=5000)
        add_variant(session, v1, "onnx-fp32", passed=False)
    at = app(Role.ML_ENGINEER)
    at.switch_page("views/models.py").run()
    assert not at.exception
    variants = at.dataframe[1].value
    assert variants["runtime"].tolist() == ["torch-fp32", "onnx-fp32", "onnx-int8"]
    assert variants["check"].tolist() == ["passed", "refused", "passed"]
    # Only what passed is offered.
    assert at.selectbox(key="runtime:pneumonia-cxr").options == ["torch-fp32", "onnx-int8"]
    at.selectbox(key="runtime:pneumonia-cxr").set_value("onnx-int8").run()
    at.button(key="serve:pneumonia-cxr").click().run()
    assert not at.exception
    assert events(runtime, "serve") == [("max", "pneumonia-cxr:v1")]

    with unit_of_work(runtime.session_factory) as session:
        study = session.scalars(select(Study).where(Study.study_uid == uids["HIGH"])).one()
        v2 = make_model_version(session, version=2)
        add_prediction(
            session,
            study,
            v2,
            0.93,
            created_at=study.received_at + timedelta(hours=1),
            runtime=VariantRuntime.ONNX_INT8,
        )
    at = study_page(uids["HIGH"])
    assert not at.exception
    assert any("onnx-int8 variant of pneumonia-cxr:v2" in c.value for c in at.caption)


def test_radiologist_never_reaches_models_pipeline_or_audit(runtime: Runtime) -> None:
    seed(runtime, ("HIGH", 0.91))
    at = app().run()
    for page in ("views/models.py", "views/pipeline.py", "views/audit.py"):
        # Not registered for a radiologist: no URL leads there.
        with pytest.raises(ValueError, match="Could not find a navigation page"):
            at.switch_page(page)
    assert not [b for b in at.button if "Promote" in b.label]


def test_pipeline_page_without_prefect_server(runtime: Runtime, embedded: None) -> None:
    seed(runtime, ("HIGH", 0.91))
    at = app(Role.ML_ENGINEER)
    at.switch_page("views/pipeline.py")
    at.run()
    assert not at.exception
    assert at.title[0].value == "Pipeline"
    assert any("PREFECT_API_URL" in i.value for i in at.info)


def test_admin_filters_the_audit_trail(runtime: Runtime) -> None:
    uids = seed(runtime, ("HIGH", 0.91))
    study_page(uids["HIGH"])
    at = app(Role.ADMIN)
    at.switch_page("views/audit.py")
    at.run()
    assert not at.exception
    at.selectbox(key="audit_action").set_value("view").run()
    table = at.dataframe[0].value
    assert table[["actor", "object_id"]].values.tolist() == [["rita", uids["HIGH"]]]
