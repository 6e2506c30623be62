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
from sqlalchemy.orm import Session, sessionmaker
from torch import nn
from tqdm import tqdm

from radflow import leases
from radflow.db import (
    EvaluationSet,
    Label,
    ModelVersion,
    Patient,
    Study,
    TrainingRun,
    unit_of_work,
)
from radflow.db.base import utcnow
from radflow.dicom.geometry import SeriesPlan
from radflow.errors import NotEnoughLabels
from radflow.ingest.routing import RoutingRules, route_studies, rules_for
from radflow.learning import segmentation
from radflow.learning.cache import CacheItem, CacheStats, PreprocessCache, cache_item
from radflow.learning.device import autocast, cpu_threads, grad_scaler, select_device
from radflow.learning.evaluation import binary_metrics, choose_threshold, evaluate
from radflow.learning.inference import load_network, predict
from radflow.learning.registry import champion, epoch_recorder, judge, register
from radflow.learning.retrain import (
    TRAINING_LEASE,
    TrainingInProgress,
    lease_name,
    mark_abandoned,
    running_run,
)
from radflow.learning.tasks import Task, get_task
from radflow.leases import LeaseState
from radflow.settings import MAX_VOLUME_VOXELS, Settings
from radflow.store import ObjectStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One labelled image (or series): what the network sees and what it should say."""

    label_id: int
    object_key: str
    patient: str
    target: float
    sha256: str = ""  # the image's content digest: the preprocessing cache key
    study_id: int = 0
    split: str | None = None  # the dataset split the label came with (import), if any
    study_uid: str = ""
    value: str = ""  # the label as stored (a segmentation label names its mask)
    series: SeriesPlan | None = None  # a series task's input, in place of the one image

    def cached(self) -> CacheItem:
        """The input as the preprocessing cache loads it."""
        return cache_item(self.sha256, self.object_key, self.series)


def labelled_examples(
    session: Session,
    task: Task,
    rules: RoutingRules | None = None,
    *,
    max_voxels: int = MAX_VOLUME_VOXELS,
) -> list[Example]:
    """The latest label of each labelled study for ``task`` that has a routable input."""
    labels = session.execute(
        select(
            Label.id,
            Label.study_id,
            Label.value,
            Label.split,
            Patient.pseudonym,
            Study.study_uid,
        )
        .join(Study, Study.id == Label.study_id)
        .join(Patient, Patient.id == Study.patient_id)
        .where(Label.task == task.name)
        .order_by(Label.study_id, Label.created_at.desc(), Label.id.desc())
    ).all()
    latest = list({label.study_id: label for label in reversed(labels)}.values())
    routes = route_studies(
        session, [label.study_id for label in latest], task, rules, max_voxels=max_voxels
    )
    examples = []
    for label in sorted(latest, key=lambda row: row.study_id):
        routed = routes[label.study_id]
        if routed.instance is not None:
            examples.append(
                Example(
                    label.id,
                    routed.instance.object_key,
                    label.pseudonym,
                    task.target(label.value),
                    sha256=routed.instance.sha256,
                    study_id=label.study_id,
                    split=label.split,
                    study_uid=label.study_uid,
                    value=label.value,
                    series=routed.plan,
                )
            )
    return examples


def split_by_patient(
    examples: Sequence[Example], val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Train/validation split with every patient on one side only (no leakage).

    Stratified by patient (any positive study or none), so a small labelled set still gets
    both classes on the validation side.
    """
    positive: dict[str, bool] = {}
    for e in examples:
        positive[e.patient] = positive.get(e.patient, False) or e.target >= 0.5
    rng = random.Random(seed)
    val_patients: set[str] = set()
    for group in (True, False):
        patients = sorted(p for p, pos in positive.items() if pos == group)
        rng.shuffle(patients)
        n_val = round(len(patients) * val_fraction)
        if len(patients) >= 2:
            n_val = max(1, n_val)
        val_patients.update(patients[:n_val])
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
        clipped = np.clip(val_scores, 1e-7, 1 - 1e-7)
        targets = val[1].numpy()
        row = {
            "epoch": float(epoch),
            "train_loss": float(np.mean(losses)),
            "val_loss": float(
                -np.mean(targets * np.log(clipped) + (1 - targets) * np.log1p(-clipped))
            ),
            "val_auc": metrics["auc"],
            "seconds": time.perf_counter() - started,
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


@dataclass(frozen=True)
class DataSplit:
    train: list[Example]
    val: list[Example]
    policy: str


def evaluation_set(
    session: Session, task: Task, examples: Sequence[Example], seed: int
) -> EvaluationSet:
    """The task's fixed evaluation set: made on the first training from the labels, then frozen."""
    found = session.scalar(select(EvaluationSet).where(EvaluationSet.task == task.name))
    if found is not None:
        return found
    named = [e for e in examples if e.split == task.evaluation.split]
    if named:
        chosen, policy = named, f"split:{task.evaluation.split}"
    else:
        _, chosen = split_by_patient(examples, task.plan.val_fraction, seed)
        policy = f"patients:{task.plan.val_fraction:g}"
    created = EvaluationSet(
        task=task.name, policy=policy, study_ids=sorted(e.study_id for e in chosen)
    )
    session.add(created)
    session.flush()
    return created


def split_for_training(examples: Sequence[Example], frozen: EvaluationSet) -> DataSplit:
    """Validation = the labelled studies of the evaluation set; training = every other one.

    Selection (best epoch) and the threshold use validation; the evaluation set never trains.
    """
    held_out = set(frozen.study_ids)
    train = [e for e in examples if e.study_id not in held_out]
    val = [e for e in examples if e.study_id in held_out]
    return DataSplit(train, val, frozen.policy)


def train_task(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    task_name: str,
    *,
    progress: bool = True,
    actor: str = "radflow",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    holder: str | None = None,
    taken_over: Callable[[LeaseState], None] | None = None,
) -> ModelVersion:
    """Train a new version of ``task_name`` on every labelled study, evaluate and register it.

    The version becomes champion only if it beats the current one on the evaluation set
    (radflow.learning.evaluation.decide); the decision and its reason are stored either way.
    One training per task at a time: it holds the task's lease (radflow.learning.retrain)
    while it runs, as ``holder`` (default: this host and process), and raises
    TrainingInProgress when a live training holds it. ``taken_over``: told about the holder of
    an expired lease taken over (its runs are marked abandoned here).
    """
    task = get_task(task_name)
    holder = holder or leases.this_process()
    name = lease_name(task.name)
    attempt = leases.try_acquire(session_factory, name, holder, TRAINING_LEASE)
    if not attempt.ok:
        with session_factory() as session:
            busy = running_run(session, task.name)
        raise TrainingInProgress(task.name, busy.id if busy else None, attempt.current)
    with leases.Renewed(session_factory, name, holder, TRAINING_LEASE):
        if attempt.taken_over is not None:
            _abandon_dead(session_factory, task.name, attempt.taken_over, taken_over)
        return _train(settings, session_factory, store, task, progress, actor, on_epoch)


def _abandon_dead(
    session_factory: sessionmaker[Session],
    task: str,
    dead: LeaseState,
    taken_over: Callable[[LeaseState], None] | None,
) -> None:
    reason = f"its lease expired: {dead.describe()} stopped renewing it (its process died)"
    with unit_of_work(session_factory) as session:
        abandoned = mark_abandoned(session, task, reason)
    logger.warning("training runs %s of %s abandoned: %s", abandoned, task, reason)
    if taken_over is not None:
        taken_over(dead)


def _train(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    task: Task,
    progress: bool,
    actor: str,
    on_epoch: Callable[[dict[str, float]], None] | None,
) -> ModelVersion:
    with unit_of_work(session_factory) as session:
        examples = labelled_examples(
            session, task, rules_for(settings), max_voxels=settings.max_volume_voxels
        )
        _check_enough(task, examples)
        split = split_for_training(examples, evaluation_set(session, task, examples, settings.seed))
        _check_enough(task, split.val, what="evaluation-set")
        run = TrainingRun(
            task=task.name,
            params={
                "seed": settings.seed,
                "n_train": len(split.train),
                "n_val": len(split.val),
                "split_policy": split.policy,
                "device": str(select_device()),
                **task.plan.__dict__,
            },
            label_ids=[str(e.label_id) for e in examples],
        )
        session.add(run)
    logger.info(
        "training %s on %d studies (%d validation, %s)",
        task.name,
        len(split.train),
        len(split.val),
        split.policy,
    )
    trainer = segmentation.train_and_register if task.segmentation else _train_and_register
    try:
        version = trainer(
            settings, session_factory, store, task, run.id, split, progress, actor, on_epoch
        )
    except BaseException as exc:
        with unit_of_work(session_factory) as session:
            failed = session.get_one(TrainingRun, run.id)
            failed.status, failed.error, failed.finished_at = "failed", str(exc)[:1024], utcnow()
        raise
    return version


def _train_and_register(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    task: Task,
    run_id: int,
    split: DataSplit,
    progress: bool,
    actor: str,
    on_epoch: Callable[[dict[str, float]], None] | None,
) -> ModelVersion:
    cache = PreprocessCache(settings.cache_dir, task)
    stats = CacheStats()
    train = _tensors(cache, store, split.train, stats)
    val = _tensors(cache, store, split.val, stats)
    history, record_epoch = epoch_recorder(session_factory, run_id, on_epoch)

    device = select_device()
    with cpu_threads(settings.torch_threads or None):
        result = fit(
            task,
            train,
            val,
            seed=settings.seed,
            device=device,
            progress=progress,
            on_epoch=record_epoch,
        )
    threshold = choose_threshold(task.operating_point, result.val_targets, result.val_scores)
    metrics: dict[str, Any] = evaluate(result.val_targets, result.val_scores, threshold)
    metrics["train_images_per_second"] = result.images_per_second
    metrics["data_seconds"] = stats.seconds
    with unit_of_work(session_factory) as session:
        finished = session.get_one(TrainingRun, run_id)
        finished.status, finished.finished_at = "completed", utcnow()
        finished.history = {
            "epochs": history,
            "data_loading": {
                "seconds": stats.seconds,
                "cache_hits": stats.hits,
                "cache_misses": stats.misses,
            },
        }
        current = champion(session, task.name)
        champion_scores = (
            predict(load_network(store, current, device), val[0], device, task.plan.batch_size)
            if current is not None
            else None
        )
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
        judge(
            session,
            version,
            current,
            result.val_targets,
            result.val_scores,
            champion_scores,
            alpha=settings.promotion_alpha,
            actor=actor,
        )
    return version


def _check_enough(task: Task, examples: Sequence[Example], what: str = "labelled") -> None:
    least = task.plan.min_labels if what == "labelled" else 2
    if task.segmentation:
        if len(examples) < least:
            raise NotEnoughLabels(
                f"{task.name} needs at least {least} {what} studies with a mask; found "
                f"{len(examples)}. Import or upload more masks, then train again."
            )
        return
    positives = sum(e.target for e in examples)
    if len(examples) < least or positives < 1 or positives == len(examples):
        raise NotEnoughLabels(
            f"{task.name} needs at least {least} {what} studies with both "
            f"{task.labels[0]!r} and {task.labels[1]!r} present; found {len(examples)} "
            f"({int(positives)} {task.positive}). Label more studies, then train again."
        )


def _tensors(
    cache: PreprocessCache, store: ObjectStore, examples: Sequence[Example], stats: CacheStats
) -> tuple[torch.Tensor, torch.Tensor]:
    images, loaded = cache.load(store, [e.cached() for e in examples])
    stats.add(loaded)
    return images, torch.tensor([e.target for e in examples], dtype=torch.float32)


def summary(version: ModelVersion, history: list[dict[str, float]] | None = None) -> dict[str, Any]:
    """What a training produced, for the CLI and the flow's artifacts (JSON-able)."""
    return {
        "model": version.name,
        "status": str(version.status),
        "threshold": version.threshold,
        **version.metrics,
        "history": history or [],
    }


def run_history(session: Session, version: ModelVersion) -> list[dict[str, float]]:
    """The per-epoch metrics of the training run that produced ``version``."""
    run = session.get(TrainingRun, version.training_run_id) if version.training_run_id else None
    return list(run.history.get("epochs", [])) if run is not None else []
