"""When a failed task is worth retrying: an outage (radflow.outages), never a bug or bad data."""

from __future__ import annotations

from typing import Any

from radflow.outages import is_outage


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Retry outages (database, object store, network); not deliberate errors or programming
    errors, which fail the same way every time: retrying only delays the message the user needs."""
    try:
        state.result()
    except Exception as exc:
        return is_outage(exc)
    return False
