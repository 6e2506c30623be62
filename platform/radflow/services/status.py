"""Platform status: what has been received, processed and trained, for people and scripts."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from radflow.db import Instance, Label, ModelStatus, ModelVersion, Prediction, Study


def platform_status(session: Session) -> dict[str, Any]:
    by_status = dict(
        session.execute(select(Study.status, func.count()).group_by(Study.status)).all()
    )
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
    }
