"""Exclusive work across processes and machines, with crash recovery in seconds.

A lease (radflow.db.leases.Lease) names a piece of work ("score:pneumonia-cxr",
"train:pneumonia-cxr") and who holds it until when. Its holder renews it on a thread while it
works (:class:`Renewed`, every third of the time to live) and deletes it when done; a holder
whose process died stops renewing, so its lease expires and the next taker gets it, told whom
it took over from (to mark that work abandoned). Acquiring is one conditional UPDATE, or an
INSERT that a concurrent taker's INSERT makes fail: never two holders at once.

:func:`take_turns` is the pattern for work that drains a queue (scoring every stable study):
whoever finds a live holder leaves at once, since the holder looks for more work after letting
go; so a burst of triggers costs one worker's turn, and a dead holder is taken over within one
time to live.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from sqlalchemy import delete, or_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import unit_of_work
from radflow.db.base import utcnow
from radflow.db.leases import Lease
from radflow.outages import is_outage

logger = logging.getLogger(__name__)

T = TypeVar("T")


def this_process() -> str:
    """A holder name for work not started by an orchestrator: host and process id."""
    return f"{socket.gethostname()}/pid-{os.getpid()}"


def _utc(moment: datetime) -> datetime:
    # SQLite hands timestamps back without their zone; every one stored here is UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class LeaseState:
    name: str
    holder: str
    acquired_at: datetime
    renewed_at: datetime
    expires_at: datetime

    @classmethod
    def of(cls, row: Lease) -> LeaseState:
        times = (_utc(row.acquired_at), _utc(row.renewed_at), _utc(row.expires_at))
        return cls(row.name, row.holder, *times)

    def live(self, now: datetime | None = None) -> bool:
        return self.expires_at > (now or utcnow())

    def describe(self) -> str:
        renewed = (utcnow() - self.renewed_at).total_seconds()
        return (
            f"{self.holder} (since {self.acquired_at:%Y-%m-%d %H:%M:%S} UTC, renewed "
            f"{renewed:.0f} s ago, expires {self.expires_at:%H:%M:%S} UTC)"
        )


@dataclass(frozen=True)
class Acquired:
    """The outcome of one attempt: ``ok``, or the live holder in ``current``."""

    ok: bool
    current: LeaseState | None = None
    """Who holds the lease now (the live holder when not ``ok``)."""
    taken_over: LeaseState | None = None
    """When ``ok``: the expired lease taken over (its holder died), if any."""


def read(session: Session, name: str) -> LeaseState | None:
    row = session.get(Lease, name)
    return LeaseState.of(row) if row is not None else None


def try_acquire(
    session_factory: sessionmaker[Session], name: str, holder: str, ttl: timedelta
) -> Acquired:
    """Take ``name`` for ``holder`` if it is free, expired, or already ``holder``'s."""
    now = utcnow()
    with unit_of_work(session_factory) as session:
        before = read(session, name)
        values = {"holder": holder, "acquired_at": now, "renewed_at": now, "expires_at": now + ttl}
        if before is None:
            try:
                with session.begin_nested():
                    session.add(Lease(name=name, **values))
            except IntegrityError:  # another taker inserted it first
                return Acquired(False, read(session, name))
            return Acquired(True, read(session, name))
        taken = session.execute(
            update(Lease)
            .where(Lease.name == name, or_(Lease.expires_at <= now, Lease.holder == holder))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if taken.rowcount != 1:  # type: ignore[attr-defined]  # a CursorResult
            return Acquired(False, before)
    mine = LeaseState(name, holder, now, now, now + ttl)
    expired = before if before.holder != holder and not before.live(now) else None
    return Acquired(True, mine, taken_over=expired)


def renew(session_factory: sessionmaker[Session], name: str, holder: str, ttl: timedelta) -> bool:
    """Push ``holder``'s lease on; False when it is no longer ``holder``'s (taken over)."""
    now = utcnow()
    with unit_of_work(session_factory) as session:
        renewed = session.execute(
            update(Lease)
            .where(Lease.name == name, Lease.holder == holder)
            .values(renewed_at=now, expires_at=now + ttl)
            .execution_options(synchronize_session=False)
        )
        return bool(renewed.rowcount == 1)  # type: ignore[attr-defined]


def release(session_factory: sessionmaker[Session], name: str, holder: str) -> None:
    with unit_of_work(session_factory) as session:
        session.execute(delete(Lease).where(Lease.name == name, Lease.holder == holder))


class Renewed:
    """Renews ``holder``'s lease on a thread while the block runs; releases it at the end.

    A renewal that fails for an outage is tried again at the next beat (the lease still has two
    thirds of its time to live); one that finds the lease taken over logs it and stops: the
    work goes on, and the uniqueness rules of what it writes (one current prediction per study
    and version) keep a second holder from writing anything twice.
    """

    def __init__(
        self, session_factory: sessionmaker[Session], name: str, holder: str, ttl: timedelta
    ) -> None:
        self.session_factory, self.name, self.holder, self.ttl = session_factory, name, holder, ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{name}", daemon=True)
        self.lost = False

    def _beat(self) -> None:
        interval = self.ttl.total_seconds() / 3
        while not self._stop.wait(interval):
            try:
                if renew(self.session_factory, self.name, self.holder, self.ttl):
                    continue
            except Exception as exc:
                if is_outage(exc):
                    logger.warning("lease %s: renewal failed (%s); trying again", self.name, exc)
                    continue
                logger.exception("lease %s: renewal failed; no longer renewed", self.name)
            else:
                logger.error("lease %s was taken over from %s", self.name, self.holder)
            self.lost = True
            return

    def __enter__(self) -> Renewed:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        release(self.session_factory, self.name, self.holder)


def wait_turn(
    session_factory: sessionmaker[Session],
    name: str,
    holder: str,
    ttl: timedelta,
    *,
    poll_seconds: float = 0.25,
) -> Acquired:
    """The lease, once it is free or expired; not ``ok`` as soon as its holder shows it lives.

    A holder that renews while we wait is alive and will look for more work after letting go
    (:func:`take_turns`), so waiting on is pointless. One that never renews is dead, and its
    lease expires within ``ttl``: we wait at most that long.
    """
    first: LeaseState | None = None
    while True:
        attempt = try_acquire(session_factory, name, holder, ttl)
        if attempt.ok:
            return attempt
        current = attempt.current
        if current is None:  # released between the attempt and the read: try again now
            continue
        if first is None:
            first = current
        elif (current.holder, current.renewed_at) != (first.holder, first.renewed_at):
            return attempt
        time.sleep(poll_seconds)


def take_turns(
    session_factory: sessionmaker[Session],
    name: str,
    holder: str,
    ttl: timedelta,
    *,
    work: Callable[[], T],
    more: Callable[[], bool],
    taken_over: Callable[[LeaseState], None] | None = None,
) -> list[T]:
    """Run ``work`` under the lease until ``more()`` finds nothing left; [] if a live holder
    already works.

    No work is left behind: whoever asked while the holder worked left only after seeing it
    renew, and the holder asks ``more()`` after releasing, which is after that.
    """
    done: list[T] = []
    while True:
        turn = wait_turn(session_factory, name, holder, ttl)
        if not turn.ok:
            assert turn.current is not None
            logger.info("%s is held by %s: it takes this work", name, turn.current.describe())
            return done
        if turn.taken_over is not None:
            logger.warning("%s: took over from %s", name, turn.taken_over.describe())
            if taken_over is not None:
                taken_over(turn.taken_over)
        with Renewed(session_factory, name, holder, ttl):
            done.append(work())
        if not more():
            return done
