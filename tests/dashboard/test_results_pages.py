"""The DICOM results on the pages: listed on the study page, parked ones re-sent from the
pipeline page (Streamlit AppTest, as test_pages.py)."""

from __future__ import annotations

from factories import make_study
from sqlalchemy import select
from test_pages import (
    app,
    browser,
    embedded,
    events,
    markdown_texts,
    runtime,
    shown,
    study_page,
)

from radflow.db import Delivery, DeliveryStatus, Prediction, ResultKind, ResultObject, unit_of_work
from radflow.runtime import Runtime
from radflow.services.users import Role
from radflow.store import keys

__all__ = ["browser", "embedded", "runtime"]  # fixtures, used by name


# A peer's error comment is text from the network: never Markdown (issue 16).
REFUSAL = "pacs (PACS@10.0.0.9:104) rejected the association: ![x](http://evil.example/s.png)"


def _parked_result(runtime: Runtime) -> str:
    """A scored study whose SR is parked for "pacs"; its Study UID."""
    with unit_of_work(runtime.session_factory) as session:
        study = make_study(session, runtime.store, score=0.9)
        prediction = session.scalars(select(Prediction)).one()
        key = keys.derived(study.study_uid, "pneumonia-cxr", 1, "sr.1.2.3.dcm")
        runtime.store.put_bytes(key, b"sr")
        session.add(
            ResultObject(
                prediction_id=prediction.id,
                study_id=study.id,
                kind=ResultKind.SR,
                object_key=key,
                sop_instance_uid="1.2.3",
            )
        )
        session.add(
            Delivery(
                study_id=study.id,
                kind=ResultKind.SR,
                object_key=key,
                destination="pacs",
                status=DeliveryStatus.PARKED,
                attempts=6,
                last_error=REFUSAL,
            )
        )
        return study.study_uid


def test_the_study_page_lists_its_dicom_results(runtime: Runtime) -> None:
    uid = _parked_result(runtime)

    at = study_page(uid)

    assert not at.exception
    assert any(h.value == "DICOM results" for h in at.subheader)
    assert any("**SR** of pneumonia-cxr:v1" in m.value for m in at.markdown)
    assert f"pacs: parked after 6 attempt(s): {REFUSAL}" in shown(at, "p")
    assert not any("evil.example" in text for text in markdown_texts(at))


def test_an_engineer_resends_parked_results_from_the_pipeline_page(
    runtime: Runtime, embedded: None
) -> None:
    _parked_result(runtime)
    at = app(Role.ML_ENGINEER)
    at.switch_page("views/pipeline.py")
    at.run()
    assert not at.exception
    assert any(m.label == "Results parked" and m.value == "1" for m in at.metric)
    [parked] = [df.value for df in at.dataframe if "destination" in df.value.columns]
    assert parked["reason"].tolist() == [REFUSAL]

    next(b for b in at.button if b.label.startswith("Re-send")).click().run()

    assert not at.exception
    with runtime.session_factory() as session:
        assert session.scalars(select(Delivery.status)).one() == DeliveryStatus.PENDING
    assert [actor for actor, _ in events(runtime, "resend")] == ["max"]
