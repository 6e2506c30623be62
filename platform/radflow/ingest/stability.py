"""Study completion: a study is stable once no new instance has arrived for a quiet period.

DICOM has no "end of study" message, so completeness is inferred from silence (MONAI Deploy
waits 5 s, Orthanc 60 s). The state lives in the database (``Study.last_instance_at``,
``status``, ``stable_at``), so it survives restarts, and every promotion is one conditional
``UPDATE ... WHERE ... RETURNING``: with several receiver processes each study is promoted by
exactly one of them (PostgreSQL re-checks the WHERE clause after waiting for a row lock; SQLite
serialises writers), and an instance indexed concurrently keeps its study open.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, delete, update
from sqlalchemy.orm import Session

from radflow.db import Prediction, Study, StudyStatus, TaskOutcome

logger = logging.getLogger(__name__)

# A late instance that races with processing (scoring writes SCORED over the RECEIVING that the
# instance set) leaves its mark only as last_instance_at > stable_at. Looking back this far for
# such studies keeps the check on the last_instance_at index instead of scanning every study.
RACE_LOOKBACK = timedelta(days=1)


@dataclass(frozen=True)
class Promoted:
    """A study that just became stable."""

    id: int
    study_uid: str


def promote_stable(session: Session, now: datetime, quiet: float | timedelta) -> list[Promoted]:
    """Mark studies quiet for ``quiet`` (seconds or timedelta) as STABLE; return them.

    Candidates: RECEIVING studies (new, or reopened by a late instance), and studies whose newest
    instance arrived after they were last made stable (a reopen lost to a concurrent status
    write). The caller's transaction commits the change.
    """
    quiet = quiet if isinstance(quiet, timedelta) else timedelta(seconds=quiet)
    cutoff = now - quiet
    reopened_in_race = (
        (Study.status != StudyStatus.RECEIVING)
        & (Study.last_instance_at > cutoff - RACE_LOOKBACK)
        & Study.stable_at.is_not(None)
        & (Study.last_instance_at > Study.stable_at)
    )
    quiet_enough = Study.last_instance_at <= cutoff
    candidates = quiet_enough & ((Study.status == StudyStatus.RECEIVING) | reopened_in_race)
    return promote(session, candidates, now)


def promote(session: Session, where: ColumnElement[bool], now: datetime) -> list[Promoted]:
    """Make the studies matching ``where`` STABLE at ``now`` in one statement.

    Their earlier predictions (made before the study was complete) become superseded: kept as
    history, and scoring makes current ones for the whole study. What tasks concluded without a
    score (TaskOutcome: not applicable, failed) is forgotten: the complete study is routed again.
    """
    rows = session.execute(
        update(Study)
        .where(where)
        .values(status=StudyStatus.STABLE, status_reason=None, stable_at=now, updated_at=now)
        .returning(Study.id, Study.study_uid)
        .execution_options(synchronize_session=False)
    ).all()
    promoted = [Promoted(id=row[0], study_uid=row[1]) for row in rows]
    if promoted:
        session.execute(
            update(Prediction)
            .where(Prediction.study_id.in_([p.id for p in promoted]), ~Prediction.superseded)
            .values(superseded=True)
            .execution_options(synchronize_session=False)
        )
        session.execute(
            delete(TaskOutcome)
            .where(TaskOutcome.study_id.in_([p.id for p in promoted]))
            .execution_options(synchronize_session=False)
        )
        logger.info("%d studies stable", len(promoted))
    return promoted
