"""When a task is due for retraining: enough new labels since its last training.

The state lives in the database only (labels and training runs), so the trigger survives
restarts of every process: a label counts as new when it was recorded after the start of the
task's latest training run that did not fail.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from radflow.db import Label, TrainingRun
from radflow.learning.training import running_run


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
