"""The outbox: results waiting for their destinations, sent with retries, parked when hopeless.

Each ``Delivery`` row is one object for one destination. :func:`send_due` sends the due ones,
one association (C-STORE, :mod:`radflow.delivery.scu`) or one request (DICOMweb STOW-RS,
:mod:`radflow.delivery.stow`) per destination, and records each outcome:

- stored: ``sent``;
- an outage (radflow.outages.is_outage: unreachable, association refused, no answer, out of
  resources): tried again after a backoff that doubles each time, and parked with its reason
  after ``delivery_max_attempts``;
- anything else (the object refused, missing or unreadable, its destination no longer
  configured): parked at once, with the reason.

A parked delivery waits for someone to fix the cause and re-send it (:func:`resend`, from the
pipeline page). Nothing stored is touched: a delivery only ever reads its object.
Rows are claimed before they are sent (their next attempt moved a lease ahead by an UPDATE
that matches only a row still due), so two senders running at once never send the same row.
"""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import Delivery, DeliveryStatus, ResultKind, unit_of_work
from radflow.db.base import utcnow
from radflow.delivery import scu, stow
from radflow.delivery.outgoing import Outgoing
from radflow.dicom.seg import SegmentationError
from radflow.errors import RadflowError
from radflow.ingest.routing import Destination, RoutingRules, default_rules
from radflow.outages import FailureLog, describe, is_outage
from radflow.settings import Settings
from radflow.store import ObjectNotFound, ObjectStore

logger = logging.getLogger(__name__)

BATCH = 100
"""Deliveries claimed per run and destination: one association's worth."""
LEASE = timedelta(minutes=10)
"""How long a claimed delivery is left alone by other senders (a crashed sender's claims
become due again after it)."""


@dataclass
class SendReport:
    sent: int = 0
    retrying: int = 0
    parked: int = 0
    reasons: dict[int, str] = field(default_factory=dict)  # delivery id -> why not sent

    def summary(self) -> str:
        return f"results sent {self.sent}, to retry {self.retrying}, parked {self.parked}"


def enqueue(
    session: Session, study_id: int, kind: ResultKind, object_key: str, destinations: Sequence[str]
) -> int:
    """Queue ``object_key`` for each of ``destinations``; returns how many were queued."""
    for name in destinations:
        session.add(Delivery(study_id=study_id, kind=kind, object_key=object_key, destination=name))
    return len(destinations)


def send_due(
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    settings: Settings,
    rules: RoutingRules | None = None,
    *,
    now: datetime | None = None,
) -> SendReport:
    """Send every due pending delivery once (one attempt each); the outcomes are recorded.

    ``rules``: the routing rules naming the destinations (None: the packaged ones).
    Outages of the database or the object store are raised (retry the run); a destination's
    failures are recorded and never raised.
    """
    now = now or utcnow()
    rules = rules or default_rules()
    report = SendReport()
    failures = FailureLog(logger)
    claimed = _claim(session_factory, now)
    by_destination: defaultdict[str, list[Delivery]] = defaultdict(list)
    for delivery in claimed:
        by_destination[delivery.destination].append(delivery)
    for name, deliveries in by_destination.items():
        destination = rules.destination(name)
        if destination is None:
            why = Unconfigured(name)
            outcomes: dict[int, Exception | None] = {d.id: why for d in deliveries}
        else:
            outcomes = _send(store, settings, destination, deliveries, failures)
        _record(session_factory, settings, deliveries, outcomes, now, report)
    return report


class Unconfigured(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"destination {name} is no longer in the routing rules; add it back (or re-route "
            "the study) and re-send"
        )


def _claim(session_factory: sessionmaker[Session], now: datetime) -> list[Delivery]:
    """Due pending deliveries, oldest first, each claimed for this sender."""
    with unit_of_work(session_factory) as session:
        candidates = session.scalars(
            select(Delivery)
            .where(Delivery.status == DeliveryStatus.PENDING, Delivery.next_attempt_at <= now)
            .order_by(Delivery.id)
            .limit(BATCH)
        ).all()
        claimed = []
        for delivery in candidates:
            taken = session.execute(
                update(Delivery)
                .where(
                    Delivery.id == delivery.id,
                    Delivery.status == DeliveryStatus.PENDING,
                    Delivery.next_attempt_at <= now,  # not claimed by another sender since
                )
                .values(next_attempt_at=now + LEASE)
                .execution_options(synchronize_session=False)
            )
            if taken.rowcount == 1:  # type: ignore[attr-defined]  # a CursorResult
                claimed.append(delivery)
        session.expunge_all()
    return claimed


def _send(
    store: ObjectStore,
    settings: Settings,
    destination: Destination,
    deliveries: Sequence[Delivery],
    failures: FailureLog,
) -> dict[int, Exception | None]:
    outcomes: dict[int, Exception | None] = {}
    items = []
    for delivery in deliveries:
        try:
            data = store.get_bytes(delivery.object_key)
            items.append(Outgoing(delivery.id, data, pydicom.dcmread(io.BytesIO(data))))
        except ObjectNotFound as exc:
            outcomes[delivery.id] = exc
        except (InvalidDicomError, EOFError) as exc:
            outcomes[delivery.id] = exc
    if not items:
        return outcomes
    try:
        outcomes |= _sent(settings, destination, items)
    except Exception as exc:
        # Classified, not swallowed: every item gets this outcome, recorded with its reason.
        if not is_outage(exc):
            failures.failed(f"sending to {destination.name}", exc)
        outcomes |= {item.id: exc for item in items}
    return outcomes


def _sent(
    settings: Settings, destination: Destination, items: Sequence[Outgoing]
) -> dict[int, Exception | None]:
    timeout = settings.delivery_timeout_seconds
    if destination.stow_url is not None:
        return stow.send(destination, items, timeout=timeout)
    return scu.send(
        destination, items, calling_ae_title=settings.receiver_ae_title, timeout=timeout
    )


def _record(
    session_factory: sessionmaker[Session],
    settings: Settings,
    deliveries: Sequence[Delivery],
    outcomes: dict[int, Exception | None],
    now: datetime,
    report: SendReport,
) -> None:
    with unit_of_work(session_factory) as session:
        for delivery in deliveries:
            error = outcomes[delivery.id]
            attempts = delivery.attempts + 1
            values: dict[str, object] = {"attempts": attempts, "updated_at": now}
            if error is None:
                values |= {"status": DeliveryStatus.SENT, "sent_at": now, "last_error": None}
                report.sent += 1
            else:
                reason = reason_for(error)
                report.reasons[delivery.id] = reason
                if is_outage(error) and attempts < settings.delivery_max_attempts:
                    values |= {"next_attempt_at": now + _backoff(settings, attempts)}
                    report.retrying += 1
                else:
                    if is_outage(error):
                        reason = f"{reason} (gave up after {attempts} attempts)"
                    values |= {"status": DeliveryStatus.PARKED}
                    report.parked += 1
                    # The reason is on the pipeline page; the log stays free of study UIDs.
                    logger.warning("delivery %s to %s parked", delivery.id, delivery.destination)
                values["last_error"] = reason[:1024]
            session.execute(update(Delivery).where(Delivery.id == delivery.id).values(**values))


def reason_for(error: BaseException) -> str:
    """Why a result could not be made or sent, for the pipeline page."""
    if isinstance(error, ObjectNotFound):
        return f"the object {error.args[0]} is missing from the object store"
    if isinstance(error, InvalidDicomError | EOFError):
        return f"the object is not readable DICOM ({describe(error)})"
    if isinstance(error, SegmentationError):
        return f"{error.reason}: {error}"
    if isinstance(error, RadflowError | ConnectionError | Unconfigured):
        return str(error)  # written for people already
    return describe(error)


def _backoff(settings: Settings, attempts: int) -> timedelta:
    seconds = settings.delivery_retry_seconds * 2 ** (attempts - 1)
    return timedelta(seconds=min(seconds, settings.delivery_retry_max_seconds))


def resend(session: Session, delivery_ids: Sequence[int], *, now: datetime | None = None) -> int:
    """Make parked deliveries pending again, due now, with a fresh count of attempts; how many
    were parked. The caller records who asked (radflow.services.pipeline)."""
    result = session.execute(
        update(Delivery)
        .where(Delivery.id.in_(delivery_ids), Delivery.status == DeliveryStatus.PARKED)
        .values(
            status=DeliveryStatus.PENDING,
            attempts=0,
            next_attempt_at=now or utcnow(),
            updated_at=now or utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]  # a CursorResult
