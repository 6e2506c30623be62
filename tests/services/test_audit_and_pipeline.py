"""The admin's audit trail and the pipeline page's ingest rate and rejections."""

from __future__ import annotations

from datetime import timedelta

import pytest
from factories import make_study, make_user
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import Rejection, unit_of_work
from radflow.db.base import utcnow
from radflow.services.audit import AuditFilter, choices, list_events
from radflow.services.pipeline import ingest_rate, rejections
from radflow.services.study_view import view_study
from radflow.services.users import PermissionDenied, Role
from radflow.store import ObjectStore


def test_audit_trail_filters_and_is_for_admins_only(
    session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    with unit_of_work(session_factory) as session:
        uids = [make_study(session, store, score=0.5).study_uid for _ in range(3)]
        rita = make_user(session, "rita")
        ada = make_user(session, "ada", Role.ADMIN)
    with unit_of_work(session_factory) as session:
        for uid in uids:
            view_study(session, rita, uid)
        view_study(session, ada, uids[0])
    with session_factory() as session:
        with pytest.raises(PermissionDenied):
            list_events(session, rita)
        rows, total = list_events(session, ada, AuditFilter(actor="rita", action="view"), limit=2)
        assert (len(rows), total) == (2, 3)
        assert {r.object_id for r in rows} <= set(uids)
        rows, total = list_events(session, ada, AuditFilter(object_id=uids[0], action="view"))
        assert sorted(r.actor for r in rows) == ["ada", "rita"]
        future = utcnow() + timedelta(hours=1)
        assert list_events(session, ada, AuditFilter(since=future)) == ([], 0)
        actors, actions = choices(session, ada)
    assert actors == ["ada", "factory", "rita"]
    assert {"view", "user-add"} <= set(actions)


def test_ingest_rate_counts_instances_per_hour(
    session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    with unit_of_work(session_factory) as session:
        for _ in range(3):
            make_study(session, store)
        engineer = make_user(session, "max", Role.ML_ENGINEER)
        session.add(
            Rejection(
                source="folder", reason="not-dicom", message="no DICM prefix", origin="notes.txt"
            )
        )
    with session_factory() as session:
        hours = ingest_rate(session, engineer, hours=24)
        rows, by_reason = rejections(session, engineer)
    assert len(hours) == 24
    assert hours[-1][1] == 3  # the factories' instances were received just now
    assert sum(n for _, n in hours) == 3
    assert [(r.reason, r.origin, r.message) for r in rows] == [("not-dicom", None, None)]
    assert by_reason == {"not-dicom": 1}


def test_rejected_file_names_and_messages_are_for_admins_only(
    session_factory: sessionmaker[Session],
) -> None:
    """A file named after the patient, a message quoting a value: the ML engineer sees the
    reason code only."""
    with unit_of_work(session_factory) as session:
        engineer = make_user(session, "max", Role.ML_ENGINEER)
        admin = make_user(session, "ada", Role.ADMIN)
        session.add(
            Rejection(
                source="folder",
                reason="missing-uid",
                message="no SOP Instance UID in DOE_JANE_MRN7734219.dcm",
                origin="DOE_JANE_MRN7734219.dcm",
                quarantine_key="quarantine/DOE_JANE_MRN7734219.dcm",
            )
        )
    with session_factory() as session:
        (hidden,), _ = rejections(session, engineer)
        (shown,), _ = rejections(session, admin)
    assert (hidden.reason, hidden.message, hidden.origin, hidden.quarantine_key) == (
        "missing-uid",
        None,
        None,
        None,
    )
    assert shown.origin == "DOE_JANE_MRN7734219.dcm" and "MRN7734219" in (shown.message or "")
