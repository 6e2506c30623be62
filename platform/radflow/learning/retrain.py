"""When a task is due for retraining, and whether a training of it is in progress.

The state lives in the database only (labels and training runs), so the trigger survives
restarts of every process: a label counts as new when it was recorded after the start of the
task's latest training run that did not fail. A training in progress holds the task's lease
(radflow.leases), renewed while it runs, so a crashed one stops counting within a minute.
Light on purpose (no PyTorch): the receiver and
the dashboard ask it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from radflow import leases
from radflow.db import Label, Lease, TrainingRun
from radflow.db.audit import record
from radflow.db.base import utcnow
from radflow.errors import RadflowError
from radflow.leases import LeaseState

TRAINING_LEASE = timedelta(seconds=45)
"""A training renews its lease every third of this while it runs: a crashed one stops blocking
its task within 45 s (radflow.leases)."""


def lease_name(task: str) -> str:
    return f"train:{task}"


class TrainingInProgress(RadflowError):
    def __init__(self, task: str, run_id: int | None, holder: LeaseState | None) -> None:
        run = f"training run {run_id}" if run_id is not None else "a training"
        by = f", held by {holder.describe()}" if holder is not None else ""
        super().__init__(
            f"{run} of {task} is in progress{by}. Wait for it to finish; if its process died, "
            f"its lease expires within {TRAINING_LEASE.total_seconds():.0f} s and the next "
            f"training takes over. `radflow training list --task {task}` shows it, "
            "`radflow training abandon RUN_ID` ends it by hand."
        )


def running_run(session: Session, task: str) -> TrainingRun | None:
    """The task's training run in progress: marked running, and its lease still renewed."""
    lease = leases.read(session, lease_name(task))
    if lease is None or not lease.live():
        return None
    return session.scalar(
        select(TrainingRun)
        .where(TrainingRun.task == task, TrainingRun.status == "running")
        .order_by(TrainingRun.id.desc())
        .limit(1)
    )


def mark_abandoned(
    session: Session, task: str, reason: str, run_id: int | None = None
) -> list[int]:
    """End the task's runs still marked running (or just ``run_id``) as abandoned; their ids."""
    query = select(TrainingRun).where(TrainingRun.task == task, TrainingRun.status == "running")
    if run_id is not None:
        query = query.where(TrainingRun.id == run_id)
    runs = list(session.scalars(query))
    for run in runs:
        run.status, run.error, run.finished_at = "abandoned", reason[:1024], utcnow()
    return [run.id for run in runs]


def training_runs(session: Session, task: str | None = None, limit: int = 20) -> list[TrainingRun]:
    """The newest training runs (of ``task``), newest first."""
    query = select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit)
    if task is not None:
        query = query.where(TrainingRun.task == task)
    return list(session.scalars(query))


def abandon(session: Session, run_id: int, *, actor: str, reason: str) -> TrainingRun:
    """Abandon a stuck training run by hand (audited) and free its task for the next training.

    For a run whose process is gone but whose lease has not expired yet, or one that an
    operator wants stopped: its task's lease is dropped, so the next training starts at once.
    """
    run = session.get(TrainingRun, run_id)
    if run is None:
        raise LookupError(f"no training run {run_id}; `radflow training list` shows them")
    if run.status != "running":
        raise ValueError(f"training run {run_id} is {run.status}, not running: nothing to abandon")
    lease = leases.read(session, lease_name(run.task))
    mark_abandoned(session, run.task, f"abandoned by {actor}: {reason}", run_id)
    session.execute(delete(Lease).where(Lease.name == lease_name(run.task)))
    session.add(
        record(
            actor,
            "abandon-training",
            "training_run",
            run_id,
            task=run.task,
            reason=reason,
            holder=lease.holder if lease is not None else None,
        )
    )
    return run


@dataclass(frozen=True)
class RetrainStatus:
    task: str
    new_labels: int
    threshold: int
    running_run_id: int | None

    @property
    def due(self) -> bool:
        return self.running_run_id is None and self.new_labels >= self.threshold

    def describe(self) -> str:
        if self.running_run_id is not None:
            return f"{self.task}: training run {self.running_run_id} is in progress"
        verdict = "due" if self.due else "not due"
        return (
            f"{self.task}: {self.new_labels} new labels since the last training "
            f"(retrain after {self.threshold}): {verdict}"
        )


def new_labels(session: Session, task: str) -> int:
    """Labels for ``task`` recorded since its latest training run that did not fail (nor was
    abandoned)."""
    since = session.scalar(
        select(func.max(TrainingRun.started_at)).where(
            TrainingRun.task == task, TrainingRun.status.not_in(("failed", "abandoned"))
        )
    )
    query = select(func.count()).select_from(Label).where(Label.task == task)
    if since is not None:
        query = query.where(Label.created_at > since)
    return int(session.scalar(query) or 0)


def retrain_status(session: Session, task: str, threshold: int) -> RetrainStatus:
    busy = running_run(session, task)
    return RetrainStatus(task, new_labels(session, task), threshold, busy.id if busy else None)
