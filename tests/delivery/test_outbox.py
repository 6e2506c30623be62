"""Sending results to a real PACS (Orthanc): they arrive under their study; a destination that
refuses is retried with a backoff and then parked with its reason; nothing stored is lost, the
other destinations get theirs, and a re-send after the fix delivers."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from ingest.receiver.peers import Orthanc, free_port
from outbound import clear, rules, scored_segmentation, stored_in
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import Delivery, DeliveryStatus, ResultObject, unit_of_work
from radflow.db.base import utcnow
from radflow.delivery.outbox import resend, send_due
from radflow.delivery.reports import write_reports
from radflow.settings import Settings
from radflow.store import ObjectStore


def _deliveries(session_factory: sessionmaker[Session]) -> dict[str, list[Delivery]]:
    with session_factory() as session:
        found: dict[str, list[Delivery]] = {}
        for delivery in session.scalars(select(Delivery).order_by(Delivery.id)):
            found.setdefault(delivery.destination, []).append(delivery)
        session.expunge_all()
        return found


def test_the_sr_and_seg_arrive_in_the_pacs_under_their_study(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    tmp_path: Path,
    orthanc: Orthanc,
    segmentation_task: str,
) -> None:
    clear(orthanc)
    study_uid = scored_segmentation(settings, session_factory, store, tmp_path / "in")
    routing = rules({"pacs": (orthanc.aet, orthanc.dicom_port)}, task=segmentation_task)
    write_reports(session_factory, store, routing)

    report = send_due(session_factory, store, settings, routing)

    assert (report.sent, report.retrying, report.parked) == (2, 0, 0)
    with session_factory() as session:
        made = {r.sop_instance_uid: r.kind.value for r in session.scalars(select(ResultObject))}
    assert stored_in(orthanc, study_uid) == {uid: kind.upper() for uid, kind in made.items()}
    [sent] = _deliveries(session_factory).values()
    assert {d.status for d in sent} == {DeliveryStatus.SENT}
    assert all(d.sent_at is not None and d.attempts == 1 for d in sent)
    # Sent once: nothing is due any more.
    assert send_due(session_factory, store, settings, routing).sent == 0


def test_a_refusing_destination_is_retried_then_parked_and_resent_after_the_fix(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    tmp_path: Path,
    orthanc: Orthanc,
    segmentation_task: str,
) -> None:
    clear(orthanc)
    settings = settings.model_copy(
        update={"delivery_max_attempts": 3, "delivery_retry_seconds": 60.0}
    )
    study_uid = scored_segmentation(settings, session_factory, store, tmp_path / "in")
    port = orthanc.dicom_port
    wrong = rules(
        {"good": (orthanc.aet, port), "bad": ("NOT-ORTHANC", port)}, task=segmentation_task
    )
    write_reports(session_factory, store, wrong)
    start = utcnow()

    first = send_due(session_factory, store, settings, wrong, now=start)

    assert (first.sent, first.retrying, first.parked) == (2, 2, 0)
    bad = _deliveries(session_factory)["bad"]
    assert {(d.status, d.attempts) for d in bad} == {(DeliveryStatus.PENDING, 1)}
    reason = bad[0].last_error or ""
    assert "NOT-ORTHANC" in reason and "rejected the association" in reason
    assert "Called AE title not recognised" in reason
    # The backoff: not due again before a minute, then after two more minutes.
    assert (
        send_due(
            session_factory, store, settings, wrong, now=start + timedelta(seconds=59)
        ).retrying
        == 0
    )
    assert (
        send_due(
            session_factory, store, settings, wrong, now=start + timedelta(seconds=61)
        ).retrying
        == 2
    )
    assert (
        send_due(
            session_factory, store, settings, wrong, now=start + timedelta(seconds=150)
        ).retrying
        == 0
    )
    last = send_due(session_factory, store, settings, wrong, now=start + timedelta(seconds=182))

    assert (last.parked, last.retrying) == (2, 0)
    parked = _deliveries(session_factory)["bad"]
    assert {(d.status, d.attempts) for d in parked} == {(DeliveryStatus.PARKED, 3)}
    assert all("gave up after 3 attempts" in (d.last_error or "") for d in parked)
    assert all(store.exists(d.object_key) for d in parked)  # nothing stored is lost
    assert len(stored_in(orthanc, study_uid)) == 2  # the good destination has both

    # Fixed (the destination now calls the right AE title) and re-sent: delivered.
    fixed = rules({"good": (orthanc.aet, port), "bad": (orthanc.aet, port)}, task=segmentation_task)
    with unit_of_work(session_factory) as session:
        assert resend(session, [d.id for d in parked]) == 2
    later = start + timedelta(hours=1)
    assert send_due(session_factory, store, settings, fixed, now=later).sent == 2
    assert {d.status for d in _deliveries(session_factory)["bad"]} == {DeliveryStatus.SENT}


def test_an_unreachable_destination_is_an_outage_and_a_missing_object_is_parked_at_once(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    tmp_path: Path,
    segmentation_task: str,
) -> None:
    scored_segmentation(settings, session_factory, store, tmp_path / "in")
    routing = rules({"offline": ("PACS", free_port())}, task=segmentation_task)
    write_reports(session_factory, store, routing)
    seg, sr = _deliveries(session_factory)["offline"]
    store.delete(sr.object_key)

    report = send_due(session_factory, store, settings, routing)

    assert (report.retrying, report.parked) == (1, 1)
    assert "cannot associate" in report.reasons[seg.id]
    assert report.reasons[sr.id] == f"the object {sr.object_key} is missing from the object store"
    seg, sr = _deliveries(session_factory)["offline"]
    assert (seg.status, sr.status, sr.attempts) == (
        DeliveryStatus.PENDING,
        DeliveryStatus.PARKED,
        1,
    )


def test_a_destination_removed_from_the_rules_parks_its_deliveries(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    tmp_path: Path,
    segmentation_task: str,
) -> None:
    scored_segmentation(settings, session_factory, store, tmp_path / "in")
    write_reports(session_factory, store, rules({"old": ("OLD", 104)}, task=segmentation_task))

    report = send_due(session_factory, store, settings, rules({}, task=segmentation_task))

    assert report.parked == 2
    assert all(
        "no longer in the routing rules" in (d.last_error or "")
        for d in _deliveries(session_factory)["old"]
    )
