"""Platform status: what has been received, processed and trained, for people and scripts."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from radflow.db import (
    Instance,
    Label,
    ModelStatus,
    ModelVersion,
    Prediction,
    Rejection,
    Study,
    StudyStatus,
)
from radflow.settings import Settings


def platform_status(session: Session, settings: Settings | None = None) -> dict[str, Any]:
    rows = session.execute(select(Study.status, func.count()).group_by(Study.status)).all()
    by_status: dict[StudyStatus, int] = {status: count for status, count in rows}
    champions = session.scalars(
        select(ModelVersion).where(ModelVersion.status == ModelStatus.CHAMPION)
    ).all()
    return {
        "studies": sum(by_status.values()),
        "studies_by_status": {str(k): v for k, v in sorted(by_status.items())},
        "instances": session.scalar(select(func.count()).select_from(Instance)),
        "predictions": session.scalar(select(func.count()).select_from(Prediction)),
        "labels": session.scalar(select(func.count()).select_from(Label)),
        "champions": {m.task: m.name for m in champions},
        "stable_studies": by_status.get(StudyStatus.STABLE, 0),
        "rejections": rejection_counts(session),
        **({"receiver": receiver_status(session, settings)} if settings else {}),
    }


def rejection_counts(session: Session) -> dict[str, dict[str, int]]:
    """Refused inputs by source (receiver, folder = quarantined, ingest) and reason."""
    rows = session.execute(
        select(Rejection.source, Rejection.reason, func.count()).group_by(
            Rejection.source, Rejection.reason
        )
    ).all()
    counts: dict[str, dict[str, int]] = {}
    for source, reason, n in sorted(rows):
        counts.setdefault(source, {})[reason] = n
    return counts


def receiver_status(session: Session, settings: Settings) -> dict[str, Any]:
    """The DICOM receiver: its counters, its spool backlog, its rejections by reason, whether it
    accepts instances now (and why not), the health of its indexer(s), and whether its port
    speaks TLS as configured (``tls``: off, on, or mutual: senders' certificates required).

    Summed over the spool folders of all receiver processes (RADFLOW_RECEIVER_WORKERS); each
    indexer's health is shown by spool folder (``.`` is the single receiver's).
    """
    from radflow.ingest.receiver import spool_report, tls

    by_reason = session.execute(
        select(Rejection.reason, func.count())
        .where(Rejection.source == "receiver")
        .group_by(Rejection.reason)
    ).all()
    report = spool_report(
        settings.spool, settings.receiver_min_free_bytes, settings.receiver_max_used_percent
    )
    return {
        **report,
        "tls": tls.mode(settings),
        "rejected": {reason: n for reason, n in sorted(by_reason)},
    }
