"""What starts the process flow when studies become stable.

- A Prefect server runs (flows/launcher.py ``orchestrated``): one ``radflow.study.stable`` event
  per pass that found studies stable, however many (a burst of studies starts one run, which
  scores them all); the ``process`` deployment's trigger (flows/deployments.py) starts the run
  on a worker. No event while a run an earlier event started still waits to start: it reads
  the database when it starts, so a trickle of studies on a busy machine does not pile up a
  process start per study. An event lost (the server was down) loses nothing: the studies
  stay STABLE in the database, and the reconciler (flows/launcher.py ``reconcile``) starts
  their scoring.
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

from flows.launcher import STABLE_EVENT, STABLE_RESOURCE, emit, event_run_waiting, orchestrated
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
    rt: Runtime, *, now: datetime | None = None, mode: TriggerMode | None = None
) -> StabiliseResult:
    """Promote the studies quiet for ``stable_after_seconds`` and start processing them."""
    with unit_of_work(rt.session_factory) as session:
        promoted = promote_stable(session, now or utcnow(), rt.settings.stable_after_seconds)
    result = StabiliseResult(promoted=promoted)
    if not promoted:
        return result
    result.mode = mode or trigger_mode()
    if result.mode == "event":
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
