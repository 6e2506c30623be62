"""Routing: which image of a study a task looks at, or why the task does not apply."""

from __future__ import annotations

from dataclasses import dataclass

from radflow.db import Instance, Study
from radflow.tasks import Task


@dataclass(frozen=True)
class Routed:
    instance: Instance | None
    reason: str | None  # why nothing matched, when instance is None


def route(study: Study, task: Task) -> Routed:
    """The first image of the first series the task applies to."""
    reasons = []
    for series in study.series:
        mismatch = task.route.matches(series.modality, series.body_part)
        if mismatch is None and series.instances:
            return Routed(series.instances[0], None)
        reasons.append(f"series {series.number or '?'}: {mismatch or 'no instances'}")
    return Routed(None, f"no series for {task.name} (" + "; ".join(reasons) + ")")
