"""Training: labelled studies -> a network -> a registered model version."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload, sessionmaker
from torch import nn
from tqdm import tqdm

from radflow.db import Label, ModelVersion, Series, Study, TrainingRun, unit_of_work
from radflow.db.base import utcnow
from radflow.device import autocast, grad_scaler, select_device
from radflow.errors import NotEnoughLabels
from radflow.metrics import binary_metrics, youden_threshold
from radflow.preprocess import load_batch
from radflow.registry import register
from radflow.routing import route
from radflow.settings import Settings
from radflow.store import ObjectStore
from radflow.tasks import Task, get_task

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One labelled image: what the network sees and what it should say."""

    label_id: int
    object_key: str
    patient: str
    target: float


def labelled_examples(session: Session, task: Task) -> list[Example]:
    """The latest label of each labelled study for ``task`` that has a routable image."""
    labels = session.scalars(
        select(Label)
        .where(Label.task == task.name)
        .order_by(Label.study_id, Label.created_at.desc(), Label.id.desc())
        .options(
            selectinload(Label.study).selectinload(Study.series).selectinload(Series.instances),
            selectinload(Label.study).selectinload(Study.patient),
        )
    ).all()
    examples, seen = [], set()
    for label in labels:
        if label.study_id in seen:
            continue
        seen.add(label.study_id)
        routed = route(label.study, task)
        if routed.instance is not None:
            examples.append(
                Example(
                    label.id,
                    routed.instance.object_key,
                    label.study.patient.pseudonym,
                    task.target(label.value),
                )
            )
    return examples


def split_by_patient(
    examples: Sequence[Example], val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Train/validation split with every patient on one side only (no leakage)."""
    patients = sorted({e.patient for e in examples})
    random.Random(seed).shuffle(patients)
    n_val = max(1, round(len(patients) * val_fraction))
    val_patients = set(patients[:n_val])
    train = [e for e in examples if e.patient not in val_patients]
    val = [e for e in examples if e.patient in val_patients]
    return train, val


@dataclass
class FitResult:
    network: nn.Module
    history: list[dict[str, float]]
    val_targets: np.ndarray
    val_scores: np.ndarray
    images_per_second: float


def fit(
    task: Task,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    seed: int,
    device: torch.device,
    progress: bool = True,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> FitResult:
    """Train ``task``'s network; keep the epoch with the best validation AUC."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    plan = task.plan
    network = task.build_network().to(device)
    optimiser = torch.optim.AdamW(
        network.parameters(), lr=plan.learning_rate, weight_decay=plan.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=plan.epochs)
    scaler = grad_scaler(device)
    loss_fn = nn.BCEWithLogitsLoss()
    augment = task.augmentation()
    augment.set_random_state(seed)
    x_train, y_train = train
    generator = torch.Generator().manual_seed(seed)
    best: tuple[float, dict[str, torch.Tensor], np.ndarray] | None = None
    history: list[dict[str, float]] = []
    seen, busy = 0, 0.0
    bar = tqdm(total=plan.epochs * len(x_train), disable=not progress, unit="img", desc=task.name)
    for epoch in range(1, plan.epochs + 1):
        network.train()
        started, losses = time.perf_counter(), []
        for idx in torch.split(torch.randperm(len(x_train), generator=generator), plan.batch_size):
            batch = torch.stack([torch.as_tensor(augment(x)) for x in x_train[idx]]).to(device)
            optimiser.zero_grad(set_to_none=True)
            with autocast(device):
                loss = loss_fn(network(batch).squeeze(1), y_train[idx].to(device))
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            losses.append(loss.item())
            bar.update(len(idx))
        schedule.step()
        busy += time.perf_counter() - started
        seen += len(x_train)
        val_scores = predict(network, val[0], device, plan.batch_size)
        metrics = binary_metrics(val[1].numpy(), val_scores, 0.5)
        row = {
            "epoch": float(epoch),
            "train_loss": float(np.mean(losses)),
            "val_auc": metrics["auc"],
        }
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_auc=f"{row['val_auc']:.3f}")
        if on_epoch:
            on_epoch(row)
        if best is None or metrics["auc"] > best[0]:
            state = {k: v.detach().clone() for k, v in network.state_dict().items()}
            best = (metrics["auc"], state, val_scores)
    bar.close()
    assert best is not None
    network.load_state_dict(best[1])
    return FitResult(network.eval(), history, val[1].numpy(), best[2], seen / max(busy, 1e-9))


@torch.no_grad()
def predict(
    network: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int
) -> np.ndarray:
    """Probabilities of the positive class for a stack of preprocessed images."""
    network.eval()
    out = []
    for batch in torch.split(images, batch_size):
        with autocast(device):
            out.append(torch.sigmoid(network(batch.to(device)).float().squeeze(1)).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def train_task(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    task_name: str,
    *,
    progress: bool = True,
    actor: str = "radflow",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> ModelVersion:
    """Train a new version of ``task_name`` on every labelled study and register it."""
    task = get_task(task_name)
    with unit_of_work(session_factory) as session:
        examples = labelled_examples(session, task)
        _check_enough(task, examples)
        train, val = split_by_patient(examples, task.plan.val_fraction, settings.seed)
        run = TrainingRun(
            task=task.name,
            params={
                "seed": settings.seed,
                "n_train": len(train),
                "n_val": len(val),
                **task.plan.__dict__,
            },
            label_ids=[str(e.label_id) for e in examples],
        )
        session.add(run)
    logger.info("training %s on %d studies (%d validation)", task.name, len(train), len(val))
    try:
        result = fit(
            task,
            _tensors(task, store, train),
            _tensors(task, store, val),
            seed=settings.seed,
            device=select_device(),
            progress=progress,
            on_epoch=on_epoch,
        )
    except BaseException as exc:
        with unit_of_work(session_factory) as session:
            failed = session.get_one(TrainingRun, run.id)
            failed.status, failed.error, failed.finished_at = "failed", str(exc)[:1024], utcnow()
        raise
    threshold = youden_threshold(result.val_targets, result.val_scores)
    metrics = binary_metrics(result.val_targets, result.val_scores, threshold)
    metrics["train_images_per_second"] = result.images_per_second
    with unit_of_work(session_factory) as session:
        finished = session.get_one(TrainingRun, run.id)
        finished.status, finished.finished_at = "completed", utcnow()
        finished.history = {"epochs": result.history}
        version = register(
            session,
            store,
            task,
            result.network,
            metrics=metrics,
            threshold=threshold,
            training_run=finished,
            actor=actor,
        )
    return version


def _check_enough(task: Task, examples: Sequence[Example]) -> None:
    positives = sum(e.target for e in examples)
    if len(examples) < task.plan.min_labels or positives == 0 or positives == len(examples):
        raise NotEnoughLabels(
            f"{task.name} needs at least {task.plan.min_labels} labelled studies with both "
            f"{task.labels[0]!r} and {task.labels[1]!r} present; found {len(examples)} "
            f"({int(positives)} {task.positive}). Label more studies, then train again."
        )


def _tensors(
    task: Task, store: ObjectStore, examples: Sequence[Example]
) -> tuple[torch.Tensor, torch.Tensor]:
    images = load_batch(task, store, [e.object_key for e in examples])
    return images, torch.tensor([e.target for e in examples], dtype=torch.float32)


def summary(version: ModelVersion) -> dict[str, Any]:
    return {"model": version.name, "status": str(version.status), **version.metrics}
