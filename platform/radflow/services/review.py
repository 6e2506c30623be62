"""A radiologist's review of a study: agree, disagree or set the label, with a comment.

A review is a label (``source="review"``, the reviewer as author) plus an audit event, and it
marks the study REVIEWED. The caller commits (``unit_of_work``) so all three land together.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from radflow.db import Prediction, Study, StudyStatus
from radflow.db.audit import record
from radflow.ingest.routing import route_studies, rules_for
from radflow.learning.labels import add_label
from radflow.learning.tasks import TASKS, get_task
from radflow.services.study_view import StudyNotFound
from radflow.services.users import Permission, Principal, require
from radflow.services.worklist import REVIEW_SOURCE, WorklistFilter, list_studies
from radflow.settings import Settings

MAX_COMMENT = 1024


class Verdict(enum.StrEnum):
    AGREE = "agree"
    """The model's call (at its threshold) is right."""
    DISAGREE = "disagree"
    """The model's call is wrong: the other label of the binary task."""
    LABEL = "label"
    """The reviewer names the label directly (also for studies without a prediction)."""


@dataclass(frozen=True)
class ReviewTask:
    """A task as the review form offers it: its name and the label values it takes."""

    name: str
    labels: tuple[str, ...]
    positive: str
    masks: bool = False
    """Reviewed as masks (a segmentation task: radflow.services.mask_review), not labels."""


def review_tasks(session: Session, settings: Settings, study_uid: str) -> list[ReviewTask]:
    """The tasks a reviewer can label this study for: those that apply to it (routing: a rule
    of the task matches one of its series, which for a volume task is one volume), the task of
    its latest prediction first, then in the registry's order. Empty when none applies."""
    study = session.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        raise StudyNotFound(study_uid)
    latest = (
        session.get(Prediction, study.latest_prediction_id) if study.latest_prediction_id else None
    )
    rules = rules_for(settings)
    names = [latest.task] if latest is not None else []
    for task in TASKS.values():
        if task.name in names:
            continue
        routed = route_studies(
            session, [study.id], task, rules, max_voxels=settings.max_volume_voxels
        )[study.id]
        if routed.instance is not None:
            names.append(task.name)
    return [review_task(name) for name in names]


def review_task(name: str) -> ReviewTask:
    """One task of :func:`review_tasks` (UnknownTask if the registry has no such task)."""
    task = get_task(name)
    return ReviewTask(task.name, tuple(task.labels), task.positive, task.segmentation)


def clean_comment(comment: str | None) -> str | None:
    """A reviewer's comment as stored: stripped, at most MAX_COMMENT characters, None if empty."""
    return comment.strip()[:MAX_COMMENT] if comment and comment.strip() else None


@dataclass(frozen=True)
class ReviewResult:
    study_uid: str
    task: str
    value: str
    verdict: Verdict
    label_id: int


def submit_review(
    session: Session,
    principal: Principal,
    study_uid: str,
    verdict: Verdict | str,
    *,
    task: str | None = None,
    value: str | None = None,
    comment: str | None = None,
) -> ReviewResult:
    """Record a review; ``value`` is required for Verdict.LABEL, ignored otherwise.

    AGREE and DISAGREE refer to the study's latest prediction (its task unless ``task`` is
    given), so they need one; LABEL needs ``task`` when the study has none.
    """
    require(principal, Permission.REVIEW)
    verdict = Verdict(verdict)
    study = session.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        raise StudyNotFound(study_uid)
    latest = (
        session.get(Prediction, study.latest_prediction_id) if study.latest_prediction_id else None
    )
    task_name = task or (latest.task if latest else None)
    if task_name is None:
        raise ValueError("this study has no prediction: choose the task and the label to set")
    value = _value(verdict, task_name, latest, value)
    comment = clean_comment(comment)
    label = add_label(
        session,
        study_uid,
        task_name,
        value,
        source=REVIEW_SOURCE,
        author=principal.name,
        comment=comment,
    )
    study.status, study.status_reason = StudyStatus.REVIEWED, None
    session.add(
        record(
            principal.name,
            "review",
            "study",
            study_uid,
            task=task_name,
            verdict=verdict.value,
            value=value,
            label_id=label.id,
            prediction_id=latest.id if latest else None,
            commented=comment is not None,
        )
    )
    return ReviewResult(study_uid, task_name, value, verdict, label.id)


def _value(verdict: Verdict, task_name: str, latest: Prediction | None, value: str | None) -> str:
    task = get_task(task_name)
    if verdict is Verdict.LABEL:
        if value is None:
            raise ValueError(f"name the label to set: one of {', '.join(task.labels)}")
        return value
    if latest is None or latest.task != task_name:
        raise ValueError(
            f"nothing to {verdict.value} with: the study has no {task_name} prediction; "
            "set the label instead"
        )
    flagged = latest.score >= latest.model_version.threshold
    negative, positive = task.labels
    model_says = positive if flagged else negative
    if verdict is Verdict.AGREE:
        return model_says
    return negative if model_says == positive else positive


def next_unreviewed(session: Session, *, after: str | None = None) -> str | None:
    """The most urgent scored study nobody has reviewed, other than ``after``; None if done."""
    rows, _ = list_studies(
        session,
        where=WorklistFilter(status=StudyStatus.SCORED.value, reviewed=False),
        limit=2,
        count=False,
    )
    return next((r.study_uid for r in rows if r.study_uid != after), None)
