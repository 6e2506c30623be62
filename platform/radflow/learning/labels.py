"""Labels: ground truth for a study and task, from imports, reviews or the demo."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

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


CSV_COLUMNS = ("study_uid", "value")
"""Required columns of a label CSV; ``task``, ``split`` and ``comment`` are optional."""


def import_labels(
    session: Session, path: Path, default_task: str, *, author: str
) -> dict[str, int]:
    """Every row of the CSV file ``path`` as a label (source ``csv``); how many per task.

    All or nothing: a bad row raises ValueError (or LookupError for an unknown study) naming
    its line, and the caller's transaction records none of the file.
    """
    counts: Counter[str] = Counter()
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: no column {', '.join(missing)}; the header must name study_uid,value "
                "(and optionally task, split, comment)"
            )
        for line, row in enumerate(reader, start=2):
            task = (row.get("task") or "").strip() or default_task
            try:
                add_label(
                    session,
                    (row["study_uid"] or "").strip(),
                    task,
                    (row["value"] or "").strip(),
                    source="csv",
                    author=author,
                    split=(row.get("split") or "").strip() or None,
                    comment=(row.get("comment") or "").strip() or None,
                )
            except (ValueError, LookupError) as exc:
                message = f"{path} line {line}: {exc}; no label of the file was recorded"
                raise type(exc)(message) from exc
            counts[task] += 1
    return dict(counts)
