"""Scoring: stable studies -> the task's champion -> prediction rows."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from sqlalchemy import exists, select
from sqlalchemy.orm import Session, selectinload, sessionmaker
from torch import nn

from radflow.db import ModelVersion, Prediction, Series, Study, StudyStatus, unit_of_work
from radflow.device import select_device
from radflow.preprocess import load_image, preprocess
from radflow.registry import load_network, require_champion
from radflow.routing import route
from radflow.store import ObjectNotFound, ObjectStore
from radflow.tasks import get_task
from radflow.training import predict

logger = logging.getLogger(__name__)


@dataclass
class ScoreReport:
    model: str = ""
    scored: int = 0
    no_model: int = 0
    failed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"{self.model}: scored {self.scored}, no applicable model {self.no_model}, "
            f"failed {len(self.failed)}"
        )


def _pending(session: Session, model_version_id: int, limit: int) -> list[Study]:
    """Stable studies without a prediction from this model version, oldest first."""
    already = exists().where(
        Prediction.study_id == Study.id, Prediction.model_version_id == model_version_id
    )
    return list(
        session.scalars(
            select(Study)
            .where(Study.status == StudyStatus.STABLE, ~already)
            .order_by(Study.received_at, Study.id)
            .limit(limit)
            .options(selectinload(Study.series).selectinload(Series.instances))
        )
    )


def score_stable(
    session_factory: sessionmaker[Session], store: ObjectStore, task_name: str, batch_size: int
) -> ScoreReport:
    """Score every stable study with the task's champion, one batch per transaction."""
    task = get_task(task_name)
    device = select_device()
    with unit_of_work(session_factory) as session:
        champion = require_champion(session, task.name)
    network = load_network(store, champion, device)
    report = ScoreReport(model=champion.name)
    while True:
        with unit_of_work(session_factory) as session:
            studies = _pending(session, champion.id, batch_size)
            if not studies:
                return report
            routable = []
            for study in studies:
                routed = route(study, task)
                if routed.instance is None:
                    study.status, study.status_reason = StudyStatus.NO_MODEL, routed.reason
                    report.no_model += 1
                else:
                    routable.append((study, routed.instance.object_key))
            _score_batch(session, store, network, champion, routable, device, report)


def _score_batch(
    session: Session,
    store: ObjectStore,
    network: nn.Module,
    champion: ModelVersion,
    routable: list[tuple[Study, str]],
    device: torch.device,
    report: ScoreReport,
) -> None:
    task = get_task(champion.task)
    started = time.perf_counter()
    images, ok = [], []
    for study, key in routable:
        try:
            images.append(preprocess(task, load_image(store, key)))
            ok.append(study)
        except (ValueError, RuntimeError, OSError, NotImplementedError, ObjectNotFound) as exc:
            # One undecodable image fails its own study, visibly, and not the batch.
            study.status, study.status_reason = StudyStatus.FAILED, f"preprocessing: {exc}"[:255]
            report.failed[study.study_uid] = str(exc)
            logger.warning("study %s failed preprocessing: %s", study.id, exc)
    if not ok:
        return
    scores = predict(network, torch.stack(images), device, len(ok))
    per_study_ms = (time.perf_counter() - started) * 1000 / len(ok)
    for study, score in zip(ok, scores, strict=True):
        session.add(
            Prediction(
                study_id=study.id,
                model_version_id=champion.id,
                task=task.name,
                score=float(score),
                scores={task.positive: float(score)},
                derived_keys={},
                latency_ms=per_study_ms,
            )
        )
        study.status, study.status_reason = StudyStatus.SCORED, None
        report.scored += 1
