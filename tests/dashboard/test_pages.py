"""The dashboard pages under Streamlit's AppTest, on a seeded SQLite data dir.

The app reads ``Settings()`` from the environment, as it does when served, so each test points
``RADFLOW_DATA_DIR`` at its own folder and clears Streamlit's caches (they outlive one AppTest).
Most tests start logged in: a real server-side session, whose signed cookie the browser would
send; AppTest cannot send cookies, so ``context.browser_cookie`` returns it (the login form
itself is tested in test_gate.py and test_browser.py).
"""

from __future__ import annotations

import html
import json
import os
import re
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from dicom_sources import ct_series, ingest
from factories import (
    add_prediction,
    add_variant,
    make_model_version,
    make_study,
    make_user,
)
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from dashboard import context
from dashboard.gate import cookie_key
from flows import launcher
from radflow.db import (
    AuditEvent,
    DashboardSession,
    Label,
    ModelEvaluation,
    ModelStatus,
    ModelVersion,
    Rejection,
    Study,
    StudyStatus,
    TrainingRun,
    User,
    VariantRuntime,
    unit_of_work,
)
from radflow.ingest.receiver.counters import DEAD, ReceiverCounters
from radflow.learning.labels import add_label
from radflow.runtime import Runtime
from radflow.services.sessions import sign, start_session
from radflow.services.users import Principal, Role
from radflow.settings import Settings

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
USERS = {Role.RADIOLOGIST: "rita", Role.ML_ENGINEER: "max", Role.ADMIN: "ada"}


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> dict[str, str | None]:
    """The cookie jar of the one browser these tests stand for."""
    jar: dict[str, str | None] = {"cookie": None}
    monkeypatch.setattr(context, "browser_cookie", lambda: jar["cookie"])
    return jar


@pytest.fixture
def runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, browser: dict[str, str | None]
) -> Iterator[Runtime]:
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


def log_in(role: Role) -> None:
    """As the login page does: a server-side session, its signed cookie in the browser."""
    with Runtime.open(Settings()) as rt, unit_of_work(rt.session_factory) as session:
        token = start_session(session, Principal(USERS[role], role), "127.0.0.1")
        cookie = sign(token, cookie_key(rt.settings))
    context.browser_cookie = lambda: cookie  # type: ignore[method-assign]


def app(role: Role | None = Role.RADIOLOGIST) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60)
    if role is not None:
        log_in(role)
    return at


def study_page(uid: str, role: Role = Role.RADIOLOGIST) -> AppTest:
    at = app(role)
    at.query_params["study"] = uid
    at.switch_page("views/study.py")
    return at.run()


def shown(at: AppTest, tag: str) -> list[str]:
    """The text of every ``tag`` element the page rendered as HTML (dashboard/text.py), as the
    browser displays it: entities decoded."""
    return [
        html.unescape(m)
        for element in at.html
        for m in re.findall(rf"<{tag}[^>]*>(.*?)</{tag}>", element.value, flags=re.S)
    ]


def image_caption(at: AppTest) -> str:
    """The caption under the study image: the paragraph that is not the study's, the status
    reason or who is logged in."""
    others = ("Patient ", "Status reason", "Logged in as")
    (caption,) = [c for c in shown(at, "p") if not c.startswith(others)]
    return caption


def events(runtime: Runtime, action: str) -> list[tuple[str, str]]:
    with runtime.session_factory() as session:
        rows = session.execute(
            select(AuditEvent.actor, AuditEvent.object_id).where(AuditEvent.action == action)
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


def test_nothing_but_a_way_to_the_login_page_without_a_session(runtime: Runtime) -> None:
    seed(runtime, ("HIGH", 0.91))
    at = app(role=None).run()
    assert not at.exception
    assert at.title[0].value == "Radflow"
    assert not at.dataframe
    # Every path the app has leads to the same "log in" page: no page of data is known.
    with pytest.raises(ValueError, match="Known pages") as unknown:
        at.switch_page("views/worklist.py")
    known = str(unknown.value).split("Known pages: ", 1)[1]
    assert set(re.findall(r"views/(\w+\.py)", known)) == {"signed_out.py"}


def test_a_forged_cookie_opens_nothing(runtime: Runtime, browser: dict[str, str | None]) -> None:
    seed(runtime, ("HIGH", 0.91))
    at = app(role=None)
    context.browser_cookie = lambda: sign("guessed-token", b"guessed key")  # type: ignore[method-assign]
    at.run()
    assert at.title[0].value == "Radflow" and not at.dataframe


def idle_out(runtime: Runtime) -> None:
    """Move every session's last activity back beyond the idle timeout."""
    idle = timedelta(minutes=runtime.settings.session_idle_minutes, seconds=1)
    with unit_of_work(runtime.session_factory) as session:
        for row in session.scalars(select(DashboardSession)):
            row.last_seen_at = row.last_seen_at - idle


def test_an_idle_session_shows_nothing_more_and_says_why(runtime: Runtime) -> None:
    seed(runtime, ("HIGH", 0.91))
    at = app().run()
    assert at.dataframe  # the worklist, while the session is live
    idle_out(runtime)
    at.run()  # the next run: the page's idle watch, or a click
    assert at.title[0].value == "Radflow"
    assert not at.dataframe
    assert "idle too long" in at.info[0].value
    with runtime.session_factory() as session:
        ended = session.execute(
            select(AuditEvent.actor, AuditEvent.details).where(AuditEvent.action == "session-end")
        ).one()
    assert (ended.actor, ended.details["reason"]) == ("rita", "idle")


def test_log_out_ends_the_session_for_good(runtime: Runtime) -> None:
    seed(runtime, ("HIGH", 0.91))
    at = app().run()
    next(b for b in at.sidebar.button if b.label == "Log out").click().run()
    assert at.title[0].value == "Radflow" and "logged out" in at.info[0].value
    at.run()  # the same cookie again (a reload, another tab): still logged out
    assert not at.dataframe
    with runtime.session_factory() as session:
        reason = session.scalars(select(DashboardSession.end_reason)).one()
    assert reason == "logout"
    assert [actor for actor, _ in events(runtime, "session-end")] == ["rita"]


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
    assert shown(at, "h1") == ["Study HIGH"]
    at.run()  # a redraw is not another view
    assert events(runtime, "view") == [("rita", uids["HIGH"])]


def test_study_page_shows_image_heat_map_score_and_model(runtime: Runtime) -> None:
    uids = seed(runtime, ("HIGH", 0.91))
    at = study_page(uids["HIGH"])
    assert not at.exception
    assert shown(at, "h1") == ["Study HIGH"]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics == {
        "Score": "0.910",
        "P(pneumonia)": "91.0%",
        "Threshold": "0.500",
        "Model": "pneumonia-cxr:v1",
    }
    assert len(at.image) == 1
    assert "Grad-CAM of pneumonia-cxr:v1" in image_caption(at)
    at.toggle(key="gradcam").set_value(False).run()
    assert "Grad-CAM" not in image_caption(at)
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
    assert "frame 1/3" in image_caption(at)


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
    assert shown(at, "h1") == ["Study NEXT"]


def volume_study(runtime: Runtime, folder: Path, modality: str) -> str:
    """A four-slice abdominal volume of ``modality``, received through the normal ingest path."""
    series = ct_series(4, 16)
    for ds in series:
        ds.Modality = modality
    return ingest(
        series, folder / modality, runtime.settings, runtime.session_factory, runtime.store
    )


def viewer_windows(at: AppTest) -> list[str]:
    (viewer,) = at.get("component_instance")
    return [w["name"] for w in json.loads(viewer.proto.json_args)["volume"]["windows"]]


def test_window_presets_fit_the_modality(runtime: Runtime, tmp_path: Path) -> None:
    """CT presets (lung, bone...) for CT only: in the viewer of a volume and on a single image."""
    ct, mr = (volume_study(runtime, tmp_path, m) for m in ("CT", "MR"))
    with unit_of_work(runtime.session_factory) as session:
        mr_image = make_study(session, runtime.store, modality="MR").study_uid
    assert viewer_windows(study_page(ct)) == [
        "From the image",
        "Lung",
        "Mediastinum",
        "Bone",
        "Brain",
        "Abdomen",
    ]
    assert viewer_windows(study_page(mr)) == ["From the image"]
    at = study_page(mr_image)
    assert not at.exception
    assert at.selectbox(key="window").options == ["From the image"]


def test_labels_are_offered_for_the_tasks_that_apply(runtime: Runtime, tmp_path: Path) -> None:
    ct, mr = (volume_study(runtime, tmp_path, m) for m in ("CT", "MR"))
    with unit_of_work(runtime.session_factory) as session:
        radiograph = make_study(session, runtime.store).study_uid
    at = study_page(radiograph)
    assert not at.exception
    assert not [s for s in at.selectbox if s.key == "review_task"]  # one task applies
    assert at.selectbox(key="review_label").options == ["normal", "pneumonia"]
    at = study_page(ct)
    assert at.selectbox(key="review_task").options == [
        "adrenal-ct-3d",
        "adrenal-ct-seq",
        "ct-lesions",
    ]
    assert at.selectbox(key="review_label").options == ["normal", "mass"]
    at = study_page(mr)
    assert not at.exception
    assert any("No task applies" in c.value for c in at.caption)
    assert not [b for b in at.button if b.label == "Set label"]


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


HOSTILE = {
    "accession": ":red[NORMAL]",
    "description": "![x](http://evil.example/s.png)",
    "reason": "routing: :material/home: [see](http://evil.example/r)",
}


def markdown_texts(at: AppTest) -> list[str]:
    """Everything the page handed to Streamlit as Markdown (which the browser would render)."""
    kinds = ("title", "header", "subheader", "caption", "markdown", "error", "warning", "info")
    out = [str(e.value) for kind in kinds for e in getattr(at, kind)]
    out += [str(getattr(e, "label", "")) for e in at.metric]
    return out


def test_dicom_text_is_shown_as_plain_text_never_as_markdown(runtime: Runtime) -> None:
    with unit_of_work(runtime.session_factory) as session:
        study = make_study(
            session,
            runtime.store,
            accession=HOSTILE["accession"],
            score=0.7,
            status_reason=HOSTILE["reason"],
        )
        study.series[0].description = HOSTILE["description"]
        uid = study.study_uid
    at = study_page(uid)
    assert not at.exception
    assert shown(at, "h1") == [f"Study {HOSTILE['accession']}"]
    assert any(HOSTILE["description"] in p for p in shown(at, "p"))  # the image caption
    assert any(HOSTILE["reason"] in p for p in shown(at, "p"))
    for value in HOSTILE.values():
        assert not any(value in text for text in markdown_texts(at)), value
    assert not any("<img" in e.value or "<a " in e.value for e in at.html)


def test_a_study_parameter_from_the_url_is_shown_as_plain_text(runtime: Runtime) -> None:
    link = "[open the study](http://evil.example/login)"
    at = study_page(link)
    assert not at.exception
    assert "No study has this Study Instance UID" in at.error[0].value
    assert not any("evil.example" in text for text in markdown_texts(at))
    assert at.text[0].value == link


@pytest.mark.filterwarnings("ignore:Failed to encode value")  # the factory's DICOM copy
def test_bidirectional_controls_are_shown_escaped(runtime: Runtime) -> None:
    """AC<RLO>9876 displays as AC6789 if the control is passed on: shown visibly instead."""
    with unit_of_work(runtime.session_factory) as session:
        uid = make_study(session, runtime.store, accession="AC\u202e9876", score=0.4).study_uid
    at = app().run()
    assert at.dataframe[0].value["accession"].tolist() == ["AC⟨U+202E⟩9876"]
    at = study_page(uid)
    assert shown(at, "h1") == ["Study AC⟨U+202E⟩9876"]


def test_rejected_file_names_are_for_admins_only_on_the_pipeline_page(
    runtime: Runtime, embedded: None
) -> None:
    with unit_of_work(runtime.session_factory) as session:
        session.add(
            Rejection(
                source="folder",
                reason="not-dicom",
                message="no DICM prefix in DOE_JANE_MRN7734219.txt",
                origin="DOE_JANE_MRN7734219.txt",
            )
        )
    for role, sees in ((Role.ML_ENGINEER, False), (Role.ADMIN, True)):
        at = app(role)
        at.switch_page("views/pipeline.py")
        at.run()
        table = at.dataframe[0].value
        assert table["reason"].tolist() == ["not-dicom"]
        assert ("DOE_JANE_MRN7734219.txt" in table.to_string()) is sees, role


def test_the_admin_manages_accounts_on_the_users_page(runtime: Runtime) -> None:
    at = app(Role.ADMIN)
    at.switch_page("views/users.py")
    at.run()
    assert not at.exception
    assert sorted(at.dataframe[0].value["name"]) == ["ada", "max", "rita"]
    at.selectbox(key="users_chosen").set_value("rita").run()
    next(b for b in at.button if b.label == "Reset password").click().run()
    assert not at.exception
    temporary = at.code[0].value
    at.selectbox(key="users_chosen").set_value("max").run()
    next(b for b in at.button if b.label == "Deactivate").click().run()
    with runtime.session_factory() as session:
        users = {u.name: u for u in session.scalars(select(User))}
    assert users["rita"].must_change_password and not users["max"].active
    assert len(temporary) >= runtime.settings.password_min_length
    assert events(runtime, "user-reset-password") == [("ada", "rita")]
    assert events(runtime, "user-deactivate") == [("ada", "max")]
    at = app(Role.RADIOLOGIST).run()
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page("views/users.py")


def test_promoting_against_the_statistical_decision_asks_for_a_reason(runtime: Runtime) -> None:
    seed(runtime, ("HIGH", 0.91))
    with unit_of_work(runtime.session_factory) as session:
        v2 = make_model_version(session, version=2)
        session.flush()
        session.add(
            ModelEvaluation(
                model_version_id=v2.id,
                task="pneumonia-cxr",
                n_studies=40,
                auc=0.8,
                champion_auc=0.79,
                p_value=0.3,
                alpha=0.05,
                promoted=False,
                reason="not better than the champion",
            )
        )
    at = app(Role.ML_ENGINEER)
    at.switch_page("views/models.py").run()
    picker = at.selectbox(key="pick:pneumonia-cxr")
    picker.set_value(next(o for o in picker.options if "v2" in o)).run()
    assert "did not beat the champion" in at.warning[0].value
    at.button(key="promote:pneumonia-cxr").click().run()
    assert "needs a reason" in at.error[0].value
    at.text_input(key="reason:pneumonia-cxr").input("the champion misses portable films").run()
    at.button(key="promote:pneumonia-cxr").click().run()
    assert not at.exception
    assert events(runtime, "promote") == [("max", "pneumonia-cxr:v2")]


def test_pipeline_page_shows_a_stopped_indexer(runtime: Runtime, embedded: None) -> None:
    seed(runtime, ("HIGH", 0.91))
    at = app(Role.ML_ENGINEER)
    at.switch_page("views/pipeline.py")
    at.run()
    assert any("No DICOM receiver runs" in i.value for i in at.info)
    assert not at.error

    spool = runtime.settings.spool
    spool.mkdir(parents=True, exist_ok=True)
    counters = ReceiverCounters(spool / "stats.json")
    counters.indexer_state(DEAD, error="OverflowError: int too large")
    counters.save(force=True)
    at.run()
    assert not at.exception
    (shown,) = [e.value for e in at.error]
    assert "refuses instances" in shown and "OverflowError" in shown
