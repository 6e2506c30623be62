"""When a task is due for retraining, and whether a training of it is in progress.

The state lives in the database only (labels and training runs), so the trigger survives
restarts of every process: a label counts as new when it was recorded after the start of the
task's latest training run that did not fail. Light on purpose (no PyTorch): the receiver and
the dashboard ask it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from radflow.db import Label, TrainingRun
from radflow.db.base import utcnow
from radflow.errors import RadflowError


class TrainingInProgress(RadflowError):
    def __init__(self, task: str, run_id: int) -> None:
        super().__init__(
            f"a training of {task} is already running (training run {run_id}); wait for it to "
            f"finish. If its process died, it counts as abandoned after "
            f"{STALE_RUN.total_seconds() / 3600:g} h."
        )


# A run still marked running after this long lost its process (a crash, a killed worker): it no
# longer blocks new trainings. Far above any real training time of the tasks declared here.
STALE_RUN = timedelta(hours=6)


def running_run(session: Session, task: str) -> TrainingRun | None:
    """The task's training run in progress, if any (abandoned runs are not)."""
    return session.scalar(
        select(TrainingRun)
        .where(
            TrainingRun.task == task,
            TrainingRun.status == "running",
            TrainingRun.started_at > utcnow() - STALE_RUN,
        )
        .order_by(TrainingRun.id.desc())
        .limit(1)
    )


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
    """Labels for ``task`` recorded since its latest training run that did not fail."""
    since = session.scalar(
        select(func.max(TrainingRun.started_at)).where(
            TrainingRun.task == task, TrainingRun.status != "failed"
        )
    )
    query = select(func.count()).select_from(Label).where(Label.task == task)
    if since is not None:
        query = query.where(Label.created_at > since)
    return int(session.scalar(query) or 0)


def retrain_status(session: Session, task: str, threshold: int) -> RetrainStatus:
    busy = running_run(session, task)
    return RetrainStatus(task, new_labels(session, task), threshold, busy.id if busy else None)
