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
from radflow.device import cpu_threads, select_device
from radflow.explain import GRADCAM_NAME, Explainer, heatmap_png
from radflow.preprocess import load_image, plain_tensors, preprocess
from radflow.registry import load_network, require_champion
from radflow.routing import RoutingRules, route
from radflow.store import ObjectNotFound, ObjectStore, keys
from radflow.tasks import Task, get_task
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
    """Stable studies without a current prediction from this model version, oldest first.

    A reopened study's earlier predictions are superseded (radflow.stability), so it is scored
    again as one whole study.
    """
    already = exists().where(
        Prediction.study_id == Study.id,
        Prediction.model_version_id == model_version_id,
        ~Prediction.superseded,
    )
    return list(
        session.scalars(
            select(Study)
            .where(Study.status.in_((StudyStatus.STABLE, StudyStatus.SCORED)), ~already)
            .order_by(Study.received_at, Study.id)
            .limit(limit)
            .options(selectinload(Study.series).selectinload(Series.instances))
        )
    )


def score_stable(
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    task_name: str,
    batch_size: int,
    *,
    explain: bool = True,
    threads: int | None = None,
    rules: RoutingRules | None = None,
) -> ScoreReport:
    """Score every stable study with the task's champion, one batch per transaction.

    Studies scored by an earlier champion and not reviewed yet count as pending too: after a
    promotion they are scored again (the earlier predictions stay, for history). With
    ``explain``, each prediction also stores a Grad-CAM heat map (radflow.explain). ``rules``:
    the site's routing rules (radflow.routing.rules_for(settings)); None means the packaged ones.
    """
    task = get_task(task_name)
    device = select_device()
    with unit_of_work(session_factory) as session:
        champion = require_champion(session, task.name)
    network = load_network(store, champion, device)
    cam_layer = champion.config.get("cam_layer", task.network.cam_layer)
    model = Explainer(network, cam_layer) if explain and cam_layer else None
    report = ScoreReport(model=champion.name)
    with cpu_threads(threads), plain_tensors():
        _score_pending(
            session_factory,
            store,
            task,
            network,
            model,
            champion,
            device,
            batch_size,
            report,
            rules,
        )
    return report


def _score_pending(
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    task: Task,
    network: nn.Module,
    model: Explainer | None,
    champion: ModelVersion,
    device: torch.device,
    batch_size: int,
    report: ScoreReport,
    rules: RoutingRules | None,
) -> None:
    while True:
        with unit_of_work(session_factory) as session:
            studies = _pending(session, champion.id, batch_size)
            if not studies:
                return
            routable = []
            for study in studies:
                routed = route(study, task, rules)
                if routed.instance is None:
                    study.status, study.status_reason = StudyStatus.NO_MODEL, routed.reason
                    report.no_model += 1
                else:
                    routable.append((study, routed.instance.object_key))
            _score_batch(session, store, network, model, champion, routable, device, report)


def _score_batch(
    session: Session,
    store: ObjectStore,
    network: nn.Module,
    explainer: Explainer | None,
    champion: ModelVersion,
    routable: list[tuple[Study, str]],
    device: torch.device,
    report: ScoreReport,
) -> None:
    task = get_task(champion.task)
    started = time.perf_counter()
    images, ok = [], []
    transform = task.preprocessing()
    for study, key in routable:
        try:
            images.append(preprocess(task, load_image(store, key), transform))
            ok.append(study)
        except (ValueError, RuntimeError, OSError, NotImplementedError, ObjectNotFound) as exc:
            # One undecodable image fails its own study, visibly, and not the batch.
            study.status, study.status_reason = StudyStatus.FAILED, f"preprocessing: {exc}"[:255]
            report.failed[study.study_uid] = str(exc)
            logger.warning("study %s failed preprocessing: %s", study.id, exc)
    if not ok:
        return
    batch = torch.stack(images)
    derived: list[dict[str, str]] = [{} for _ in ok]
    if explainer is None:
        scores = predict(network, batch, device, len(ok))
    else:
        scores, maps = explainer(batch, device)
        for study, heat, keys_out in zip(ok, maps, derived, strict=True):
            key = keys.derived(study.study_uid, task.name, champion.version, GRADCAM_NAME)
            store.put_bytes(key, heatmap_png(heat), content_type="image/png")
            keys_out["gradcam"] = key
    per_study_ms = (time.perf_counter() - started) * 1000 / len(ok)
    for study, score, derived_keys in zip(ok, scores, derived, strict=True):
        session.add(
            Prediction(
                study_id=study.id,
                model_version_id=champion.id,
                task=task.name,
                score=float(score),
                scores={task.positive: float(score)},
                derived_keys=derived_keys,
                latency_ms=per_study_ms,
            )
        )
        study.status, study.status_reason = StudyStatus.SCORED, None
        report.scored += 1
