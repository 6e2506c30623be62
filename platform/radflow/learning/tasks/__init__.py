"""The task registry: every task the platform knows, by name."""

from __future__ import annotations

from radflow.errors import UnknownTask
from radflow.learning.tasks import (
    adrenal_ct_3d,
    adrenal_ct_seq,
    ct_lesions,
    pneumonia_cxr,
    retina_vessels,
)
from radflow.learning.tasks.base import (
    EvaluationPolicy,
    NetworkSpec,
    OperatingPoint,
    Route,
    SlidingWindow,
    Task,
    TaskKind,
    TrainingPlan,
)

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        pneumonia_cxr.TASK,
        retina_vessels.TASK,
        adrenal_ct_3d.TASK,
        adrenal_ct_seq.TASK,
        ct_lesions.TASK,
    )
}
"""Every task, in declaration order; the first is the default."""

__all__ = [
    "TASKS",
    "EvaluationPolicy",
    "NetworkSpec",
    "OperatingPoint",
    "Route",
    "SlidingWindow",
    "Task",
    "TaskKind",
    "TrainingPlan",
    "default_task",
    "get_task",
]


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTask(name, sorted(TASKS)) from None


def default_task() -> Task:
    """The task commands and flows use when none is named: the first one declared."""
    return next(iter(TASKS.values()))
