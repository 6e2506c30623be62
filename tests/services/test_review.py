"""Reviews: a label with the reviewer as author, an audit event, REVIEWED, and what comes next."""

from __future__ import annotations

import pytest
from factories import make_model_version, make_study, make_user
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import AuditEvent, Label, Study, StudyStatus, unit_of_work
from radflow.services.review import Verdict, next_unreviewed, submit_review
from radflow.services.study_view import view_study
from radflow.services.users import PermissionDenied, Role
from radflow.store import ObjectStore


@pytest.mark.parametrize(
    ("score", "verdict", "expected"),
    [
        (0.9, Verdict.AGREE, "pneumonia"),
        (0.9, Verdict.DISAGREE, "normal"),
        (0.1, Verdict.AGREE, "normal"),
        (0.1, Verdict.DISAGREE, "pneumonia"),
    ],
)
def test_agree_and_disagree_follow_the_models_call(
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    score: float,
    verdict: Verdict,
    expected: str,
) -> None:
    with unit_of_work(session_factory) as session:
        uid = make_study(session, store, score=score).study_uid
        rita = make_user(session, "rita")
    with unit_of_work(session_factory) as session:
        result = submit_review(session, rita, uid, verdict, comment="  looks clear  ")
    assert result.value == expected
    with session_factory() as session:
        label = session.scalars(select(Label)).one()
        study = session.scalars(select(Study)).one()
        review = session.scalars(select(AuditEvent).where(AuditEvent.action == "review")).one()
        label_events = session.scalars(select(AuditEvent).where(AuditEvent.action == "label"))
        assert len(label_events.all()) == 1
    assert (label.value, label.source, label.author, label.comment) == (
        expected,
        "review",
        "rita",
        "looks clear",
    )
    assert study.status == StudyStatus.REVIEWED
    assert (review.actor, review.object_id) == ("rita", uid)
    assert review.details["verdict"] == verdict.value
    assert review.details["label_id"] == label.id


def test_set_label_works_without_a_prediction_and_validates_the_value(
    session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    with unit_of_work(session_factory) as session:
        uid = make_study(session, store).study_uid
        rita = make_user(session, "rita")
    with unit_of_work(session_factory) as session:
        with pytest.raises(ValueError, match="no prediction"):
            submit_review(session, rita, uid, Verdict.AGREE)
        with pytest.raises(ValueError, match="not valid"):
            submit_review(session, rita, uid, Verdict.LABEL, task="pneumonia-cxr", value="maybe")
        result = submit_review(
            session, rita, uid, Verdict.LABEL, task="pneumonia-cxr", value="normal"
        )
    assert result.value == "normal"


def test_only_reviewers_may_review_and_viewing_is_audited(
    session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    with unit_of_work(session_factory) as session:
        uid = make_study(session, store, score=0.7).study_uid
        engineer = make_user(session, "max", Role.ML_ENGINEER)
    with unit_of_work(session_factory) as session:
        with pytest.raises(PermissionDenied):
            submit_review(session, engineer, uid, Verdict.AGREE)
        view_study(session, engineer, uid)
        view_study(session, engineer, uid, audit=False)
    with session_factory() as session:
        assert session.scalars(select(Label)).all() == []
        views = session.scalars(select(AuditEvent).where(AuditEvent.action == "view")).all()
    assert [(v.actor, v.object_id) for v in views] == [("max", uid)]


def test_next_unreviewed_is_the_most_urgent_scored_study_not_yet_reviewed(
    session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    with unit_of_work(session_factory) as session:
        model = make_model_version(session)
        low = make_study(session, store, score=0.2, model=model).study_uid
        high = make_study(session, store, score=0.9, model=model).study_uid
        make_study(session, store)  # not scored: nothing to review against yet
        rita = make_user(session, "rita")
    with session_factory() as session:
        assert next_unreviewed(session) == high
        assert next_unreviewed(session, after=high) == low
    with unit_of_work(session_factory) as session:
        submit_review(session, rita, high, Verdict.AGREE)
    with session_factory() as session:
        assert next_unreviewed(session) == low
    with unit_of_work(session_factory) as session:
        submit_review(session, rita, low, Verdict.AGREE)
    with session_factory() as session:
        assert next_unreviewed(session) is None
