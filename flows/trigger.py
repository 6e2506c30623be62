"""What starts the process flow when studies become stable.

- A Prefect server runs (flows/launcher.py ``orchestrated``): one ``radflow.study.stable`` event
  per study; the ``process`` deployment's trigger (flows/deployments.py) starts the run on a
  worker.
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

from flows.launcher import STABLE_EVENT, emit, orchestrated
from radflow.db import unit_of_work
from radflow.db.base import utcnow
from radflow.db.registry import champion_tasks
from radflow.ingest.stability import Promoted, promote_stable
from radflow.runtime import Runtime

logger = logging.getLogger(__name__)

TriggerMode = Literal["event", "direct"]


@dataclass
class StabiliseResult:
    promoted: list[Promoted] = field(default_factory=list)
    mode: TriggerMode | None = None
    processed: dict[str, dict[str, object]] = field(default_factory=dict)  # task -> flow result


def trigger_mode() -> TriggerMode:
    """Events when a Prefect server is configured, a direct call on the embedded default."""
    return "event" if orchestrated() else "direct"


def study_resource(study: Promoted) -> dict[str, str]:
    # The database id, not the Study Instance UID: events are kept by Prefect, outside the
    # clinical store, and a UID identifies a patient's study.
    return {"prefect.resource.id": f"radflow.study.{study.id}", "radflow.study-id": str(study.id)}


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
        for study in promoted:
            emit(STABLE_EVENT, study_resource(study))
        logger.info("%d studies stable: %s events emitted", len(promoted), STABLE_EVENT)
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


def _tasks_with_champion(rt: Runtime) -> list[str]:
    # Without a champion there is nothing to score yet; the studies stay STABLE until one exists.
    with rt.session_factory() as session:
        return champion_tasks(session)
