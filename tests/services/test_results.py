"""DICOM results on the study page (listed, downloadable, audited) and the pipeline page
(counts, parked results, re-send by the roles allowed to)."""

from __future__ import annotations

import pytest
from factories import make_study, make_user
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import (
    AuditEvent,
    Delivery,
    DeliveryStatus,
    Prediction,
    ResultKind,
    ResultObject,
    Study,
    unit_of_work,
)
from radflow.db.base import utcnow
from radflow.services.pipeline import resend_results, results_out
from radflow.services.study_view import ResultNotFound, download_result, get_study_view
from radflow.services.users import PermissionDenied, Role
from radflow.store import ObjectStore, keys


def _with_result(
    session: Session, store: ObjectStore, status: DeliveryStatus, *, error: str | None = None
) -> tuple[Study, str]:
    """A scored study with a stored SR sent (or not) to "pacs"; the study and the SR's key."""
    study = make_study(session, store, score=0.8)
    prediction = session.scalars(select(Prediction).where(Prediction.study_id == study.id)).one()
    key = keys.derived(study.study_uid, "pneumonia-cxr", 1, "sr.1.2.3.dcm")
    store.put_bytes(key, b"DICM sr bytes", content_type="application/dicom")
    session.add(
        ResultObject(
            prediction_id=prediction.id,
            study_id=study.id,
            kind=ResultKind.SR,
            object_key=key,
            sop_instance_uid=f"1.2.3.{study.id}",
        )
    )
    session.add(
        Delivery(
            study_id=study.id,
            kind=ResultKind.SR,
            object_key=key,
            destination="pacs",
            status=status,
            attempts=6 if status == DeliveryStatus.PARKED else 1,
            last_error=error,
            sent_at=utcnow() if status == DeliveryStatus.SENT else None,
        )
    )
    session.flush()
    return study, key


def test_the_study_lists_its_results_and_serves_them_audited(
    session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    with unit_of_work(session_factory) as session:
        study, key = _with_result(session, store, DeliveryStatus.SENT)
        other = make_study(session, store)
        rita = make_user(session, "rita")
    with session_factory() as session:
        [result] = get_study_view(session, study.study_uid).results
    assert (result.kind, result.model, result.object_key) == ("SR", "pneumonia-cxr:v1", key)
    assert result.file_name == "sr.1.2.3.dcm"
    [delivery] = result.deliveries
    assert (delivery.destination, delivery.status) == ("pacs", "sent")
    assert delivery.describe().startswith("pacs: sent 20")

    with unit_of_work(session_factory) as session:
        assert download_result(session, store, rita, study.study_uid, key) == b"DICM sr bytes"
    with session_factory() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "download")).one()
    assert (event.actor, event.object_id, event.details) == (
        "rita",
        study.study_uid,
        {"object_key": key},
    )
    # Only a result of that study: not another study's, not an original.
    original = other.series[0].instances[0].object_key
    for uid, asked in ((other.study_uid, key), (study.study_uid, original)):
        with session_factory() as session, pytest.raises(ResultNotFound, match="choose one"):
            download_result(session, store, rita, uid, asked)


def test_parked_results_are_listed_and_resent_by_engineers_only(
    session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    with unit_of_work(session_factory) as session:
        _with_result(session, store, DeliveryStatus.SENT)
        study, _ = _with_result(
            session, store, DeliveryStatus.PARKED, error="PACS rejected the association"
        )
        rita = make_user(session, "rita")
        max_ = make_user(session, "max", Role.ML_ENGINEER)
    with session_factory() as session:
        with pytest.raises(PermissionDenied):
            results_out(session, rita)
        out = results_out(session, max_)
    assert out.counts == {"pending": 0, "sent": 1, "parked": 1}
    [parked] = out.parked
    assert (parked.study_uid, parked.kind, parked.destination, parked.attempts) == (
        study.study_uid,
        "SR",
        "pacs",
        6,
    )
    assert parked.reason == "PACS rejected the association"

    with unit_of_work(session_factory) as session, pytest.raises(PermissionDenied):
        resend_results(session, rita, [parked.delivery_id])
    with unit_of_work(session_factory) as session:
        assert resend_results(session, max_, [parked.delivery_id]) == 1
    with session_factory() as session:
        delivery = session.get(Delivery, parked.delivery_id)
        assert delivery is not None
        assert (delivery.status, delivery.attempts) == (DeliveryStatus.PENDING, 0)
        actors = session.scalars(select(AuditEvent.actor).where(AuditEvent.action == "resend"))
        assert list(actors) == ["max"]
        assert results_out(session, max_).counts["parked"] == 0


def test_the_study_says_where_each_result_went_and_which_srs_were_not_made(
    session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    with unit_of_work(session_factory) as session:
        study, _ = _with_result(
            session, store, DeliveryStatus.PENDING, error="cannot associate with pacs"
        )
        study_id = study.id
        prediction = session.scalars(select(Prediction).where(Prediction.study_id == study_id))
        session.add(
            ResultObject(
                prediction_id=prediction.one().id,
                study_id=study_id,
                kind=ResultKind.SEG,
                error="the SEG references 1 instance(s) that are not images of this study",
            )
        )
    with session_factory() as session:
        view = get_study_view(session, study.study_uid)
    [delivery] = view.results[0].deliveries
    assert delivery.describe().startswith("pacs: pending, next try 20")
    assert delivery.describe().endswith("(attempt 1 failed: cannot associate with pacs)")
    assert view.unreported == ["the SEG references 1 instance(s) that are not images of this study"]
