"""The dashboard pages under Streamlit's AppTest, on a seeded SQLite data dir.

The app reads ``Settings()`` from the environment, as it does when served, so each test points
``RADFLOW_DATA_DIR`` at its own folder and clears Streamlit's caches (they outlive one AppTest).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import streamlit as st
from factories import make_study
from streamlit.testing.v1 import AppTest

from radflow.db import StudyStatus, unit_of_work
from radflow.runtime import Runtime
from radflow.settings import Settings

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    """A migrated, empty SQLite data dir that the app will find through the environment."""
    for name in list(os.environ):
        if name.upper().startswith("RADFLOW_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RADFLOW_DATA_DIR", str(tmp_path / "data"))
    st.cache_resource.clear()
    st.cache_data.clear()
    with Runtime.open(Settings()) as rt:
        yield rt
    st.cache_resource.clear()
    st.cache_data.clear()


def seed(runtime: Runtime, *scored: tuple[str, float | None]) -> dict[str, str]:
    """Studies by accession and score; returns accession -> Study Instance UID."""
    with unit_of_work(runtime.session_factory) as session:
        studies = {a: make_study(session, runtime.store, accession=a, score=s) for a, s in scored}
        return {accession: study.study_uid for accession, study in studies.items()}


def app() -> AppTest:
    return AppTest.from_file(str(APP), default_timeout=60)


def study_page(uid: str) -> AppTest:
    at = app()
    at.query_params["study"] = uid
    at.switch_page("pages/study.py")
    return at.run()


def test_worklist_lists_studies_by_score_with_counts(runtime: Runtime) -> None:
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
    assert "radflow ingest DIR" in message
    assert str(runtime.settings.inbox) in message
    assert not at.dataframe


def test_sort_and_status_controls_change_the_table(runtime: Runtime) -> None:
    seed(runtime, ("FIRST", 0.3), ("SECOND", 0.8))
    with unit_of_work(runtime.session_factory) as session:
        make_study(session, runtime.store, accession="BROKEN", status=StudyStatus.FAILED)
    at = app().run()
    at.selectbox(key="sort").set_value("Lowest score first").run()
    assert at.dataframe[0].value["accession"].tolist() == ["FIRST", "SECOND", "BROKEN"]
    at.selectbox(key="sort").set_value("Oldest first").run()
    assert at.dataframe[0].value["accession"].tolist() == ["FIRST", "SECOND", "BROKEN"]
    at.selectbox(key="status").set_value("failed").run()
    assert at.dataframe[0].value["accession"].tolist() == ["BROKEN"]


def test_pagination_walks_through_the_studies(runtime: Runtime) -> None:
    seed(runtime, *[(f"S{i:02d}", i / 100) for i in range(30)])
    at = app().run()
    at.selectbox(key="size").set_value(25).run()
    assert len(at.dataframe[0].value) == 25
    assert at.dataframe[0].value["accession"].iloc[0] == "S29"
    assert at.pagination[0].num_pages == 2
    at.pagination[0].set_value(2).run()
    assert at.dataframe[0].value["accession"].tolist() == ["S04", "S03", "S02", "S01", "S00"]
    assert "Studies 26–30 of 30" in at.caption[0].value


def test_selecting_a_row_opens_the_study(runtime: Runtime) -> None:
    uids = seed(runtime, ("LOW", 0.12), ("HIGH", 0.91))
    at = app().run()
    at.session_state["worklist_table"] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    assert not at.exception
    assert at.query_params["study"] == uids["HIGH"]
    assert at.title[0].value == "Study HIGH"


def test_study_page_shows_image_score_and_model(runtime: Runtime) -> None:
    uids = seed(runtime, ("HIGH", 0.91))
    at = study_page(uids["HIGH"])
    assert not at.exception
    assert at.title[0].value == "Study HIGH"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics == {"Score": "0.910", "Threshold": "0.500", "Model": "pneumonia-cxr:v1"}
    assert len(at.image) == 1
    assert not at.selectbox  # one series and not CT: nothing to choose
    history = at.dataframe[0].value
    assert history["model"].tolist() == ["pneumonia-cxr:v1"]
    series = at.dataframe[1].value
    assert series["instance_count"].tolist() == [1]


def test_unscored_study_says_so(runtime: Runtime) -> None:
    uids = seed(runtime, ("WAITING", None))
    at = study_page(uids["WAITING"])
    assert not at.exception
    assert "Not scored yet" in at.info[0].value
    assert len(at.image) == 1


def test_unknown_study_shows_an_error_not_a_traceback(runtime: Runtime) -> None:
    at = study_page("1.2.3.4.5")
    assert not at.exception
    assert "1.2.3.4.5" in at.error[0].value


def test_study_page_without_a_study_points_to_the_worklist(runtime: Runtime) -> None:
    at = app()
    at.switch_page("pages/study.py")
    at.run()
    assert not at.exception
    assert "pick one on the worklist" in at.info[0].value


def test_ct_study_offers_window_presets(runtime: Runtime) -> None:
    with unit_of_work(runtime.session_factory) as session:
        uid = make_study(
            session, runtime.store, accession="CT1", modality="CT", rescale=(1.0, -1024.0)
        ).study_uid
    at = study_page(uid)
    before = at.image[0].value
    at.selectbox[0].set_value("Lung").run()
    assert not at.exception
    assert at.image[0].value != before
