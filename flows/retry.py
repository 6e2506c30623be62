"""When a failed task is worth retrying."""

from __future__ import annotations

from typing import Any

from radflow.errors import RadflowError


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Retry outages (database, object store, network), not deliberate errors.

    A RadflowError (no champion yet, not enough labels, ...) fails the same way every time;
    retrying it only delays the message the user needs.
    """
    try:
        state.result()
    except RadflowError:
        return False
    except BaseException:
        return True
    return True
