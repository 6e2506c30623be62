"""What starts the process flow when studies become stable.

- A Prefect server runs (flows/launcher.py ``orchestrated``): one ``radflow.study.stable`` event
  per pass that found studies stable, however many (a burst of studies starts one run, which
  scores them all); the ``process`` deployment's trigger (flows/deployments.py) starts the run
  on a worker. No event while a run an earlier event started still waits to start: it reads
  the database when it starts, so a trickle of studies on a busy machine does not pile up a
  process start per study. An event lost (the server was down) loses nothing: the studies
  stay STABLE in the database, and the reconciler (flows/launcher.py ``reconcile``) starts
  their scoring.
- While a process run lingers after scoring (flows/process.py), holding the listening lease,
  no event at all: it looks for stable studies twice a second and scores them in its warm
  process. A :class:`Handoff` follows the studies handed over: should the listener's lease
  run out instead of being renewed or let go (its worker died), the event goes out after all.
- The embedded default (no server): ``process_and_deliver`` is called here, directly, for every
  task that has a champion model.

The receiver's indexer loop and ``radflow watch`` call ``stabilise_and_process`` after each
pass; it is cheap when nothing is due (one indexed UPDATE).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from flows.launcher import (
    LISTENING_LEASE,
    STABLE_EVENT,
    STABLE_RESOURCE,
    emit,
    event_run_waiting,
    listening_run,
    orchestrated,
)
from radflow import leases
from radflow.db import unit_of_work
from radflow.db.base import utcnow
from radflow.db.registry import champion_tasks
from radflow.ingest.stability import Promoted, promote_stable
from radflow.outages import describe, is_outage
from radflow.runtime import Runtime

logger = logging.getLogger(__name__)

TriggerMode = Literal["event", "direct"]


@dataclass
class StabiliseResult:
    promoted: list[Promoted] = field(default_factory=list)
    mode: TriggerMode | None = None
    emitted: bool = False
    """An event went to the server (not when a run it started earlier still waits to start)."""
    processed: dict[str, dict[str, object]] = field(default_factory=dict)  # task -> flow result
    listener: str | None = None
    """The lingering process run the studies were handed to (no event), if any."""


@dataclass
class Handoff:
    """Studies handed to a listening process run, kept by the caller's loop (the receiver's,
    ``radflow watch``'s) until the run shows it took them: it renewed its lease after the hand-
    off, or let it go (it looks once more after that). If the lease runs out instead, its worker
    died before it looked: :func:`stabilise_and_process` emits their event after all."""

    listener: leases.LeaseState | None = None
    studies: list[Promoted] = field(default_factory=list)

    def take(self, listener: leases.LeaseState, studies: list[Promoted]) -> None:
        if self.listener is None or self.listener.holder != listener.holder:
            self.listener = listener
        self.studies += studies

    def clear(self) -> None:
        self.listener, self.studies = None, []


def trigger_mode() -> TriggerMode:
    """Events when a Prefect server is configured, a direct call on the embedded default."""
    return "event" if orchestrated() else "direct"


def stable_resource(studies: list[Promoted]) -> dict[str, str]:
    # Counts and database ids, never Study Instance UIDs: events are kept by Prefect, outside
    # the clinical store, and a UID identifies a patient's study.
    ids = sorted(study.id for study in studies)
    return {
        "prefect.resource.id": STABLE_RESOURCE,
        "radflow.studies": str(len(ids)),
        "radflow.study-ids": ",".join(map(str, ids[:50])),
    }


def stabilise_and_process(
    rt: Runtime,
    *,
    now: datetime | None = None,
    mode: TriggerMode | None = None,
    handoff: Handoff | None = None,
) -> StabiliseResult:
    """Promote the studies quiet for ``stable_after_seconds`` and start processing them.
    ``handoff``: the caller's memory of studies left to a listening run (a loop's, across
    calls); without it, studies are handed over and not followed."""
    with unit_of_work(rt.session_factory) as session:
        promoted = promote_stable(session, now or utcnow(), rt.settings.stable_after_seconds)
    result = StabiliseResult(promoted=promoted)
    if handoff is not None and handoff.listener is not None:
        result.emitted = _follow(rt, handoff)
    if not promoted:
        return result
    result.mode = mode or trigger_mode()
    if result.mode == "event":
        listener = listening_run(rt)
        if listener is not None:
            if handoff is not None:
                handoff.take(listener, promoted)
            result.listener = listener.holder
            logger.info(
                "%d studies stable: %s listens for them (no event)", len(promoted), listener.holder
            )
            return result
        if _run_waiting():
            logger.info(
                "%d studies stable: a process run waiting to start takes them (no event)",
                len(promoted),
            )
            return result
        emit(STABLE_EVENT, stable_resource(promoted))
        result.emitted = True
        logger.info("%d studies stable: one %s event emitted", len(promoted), STABLE_EVENT)
        return result
    tasks = _tasks_with_champion(rt)
    if not tasks:
        return result
    # Imported only when there is something to score: the flow imports Prefect's engine, about a
    # second of CPU that a receiver process would otherwise spend while studies arrive.
    from flows.embedded import run_settings
    from flows.process import process_and_deliver

    with run_settings():
        for task_name in tasks:
            result.processed[task_name] = process_and_deliver(task_name)
    return result


def _follow(rt: Runtime, handoff: Handoff) -> bool:
    """Whether the studies handed to a listening run needed their event after all (emitted)."""
    given = handoff.listener
    assert given is not None
    with rt.session_factory() as session:
        now = leases.read(session, LISTENING_LEASE)
    if now is None or now.holder != given.holder or now.renewed_at > given.renewed_at:
        handoff.clear()  # let go (it looked once more), replaced, or alive since: it has them
        return False
    if now.live():
        return False
    logger.warning(
        "the process run listening for %d stable studies stopped renewing its lease (%s): "
        "its worker died; one %s event emitted",
        len(handoff.studies),
        now.describe(),
        STABLE_EVENT,
    )
    emit(STABLE_EVENT, stable_resource(handoff.studies))
    handoff.clear()
    return True


def _run_waiting() -> bool:
    """``event_run_waiting``, or False when the server does not answer in time: the studies are
    already promoted, so without an event they would wait for the minute schedule (after a
    worker restart the server stalled for 30 s and more). An extra run costs a process start;
    it finds nothing left if another run took the studies."""
    try:
        return event_run_waiting()
    except Exception as exc:
        if not is_outage(exc):
            raise
        logger.warning("could not ask whether a process run waits (%s): emitting", describe(exc))
        return False


def _tasks_with_champion(rt: Runtime) -> list[str]:
    # Without a champion there is nothing to score yet; the studies stay STABLE until one exists.
    with rt.session_factory() as session:
        return champion_tasks(session)
