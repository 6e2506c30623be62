"""Labels: ground truth for a study and task, from imports, reviews or the demo."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from radflow.db import Label, Study
from radflow.db.audit import record
from radflow.learning.tasks import get_task


def add_label(
    session: Session,
    study_uid: str,
    task_name: str,
    value: str,
    *,
    source: str,
    author: str,
    split: str | None = None,
    comment: str | None = None,
) -> Label:
    """Record a label (validated against the task's label schema) and its audit event."""
    task = get_task(task_name)
    task.target(value)  # raises ValueError naming the allowed values
    study = session.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        raise LookupError(f"no study with StudyInstanceUID {study_uid}; ingest it first")
    label = Label(
        study=study,
        task=task.name,
        value=value,
        source=source,
        author=author,
        split=split,
        comment=comment,
    )
    session.add(label)
    session.flush()
    session.add(
        record(author, "label", "study", study_uid, task=task.name, value=value, source=source)
    )
    return label
