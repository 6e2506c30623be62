"""The segmentation task kind (2D): masks -> a MONAI U-Net -> sliding-window masks as DICOM SEG.

Training draws patches of the task's window size from each training image (half centred on a
pixel of the structure, half on any pixel of the region that counts), augments them, and fits
the network with Dice + cross entropy. Validation, scoring and the champion comparison all see
whole images through MONAI's ``SlidingWindowInferer`` (overlap and Gaussian weighting from the
task's ``SlidingWindow``).
Evaluation counts the pixels inside each study's region (DRIVE's field of view) only: Dice, HD95
and pixel AUC; the threshold is the one with the best Dice on the evaluation set; a version
replaces the champion only on a paired per-study Dice test (radflow.learning.evaluation).

Scoring writes each study's probability map (``derived_keys["probability"]``, float16 .npy) and
its mask at the version's threshold as a DICOM SEG (``derived_keys["seg"]``), which delivery
reports in an SR and sends on.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from sqlalchemy.orm import Session, sessionmaker
from torch import nn
from tqdm import tqdm

from radflow.db import ModelVersion, TrainingRun, unit_of_work
from radflow.db.base import utcnow
from radflow.dicom.equipment import Algorithm
from radflow.dicom.seg import SEG_KEY, SegmentationError, load_sources, write_segmentation
from radflow.learning.cache import CachedImage, CacheStats, PreprocessCache
from radflow.learning.device import autocast, cpu_threads, select_device
from radflow.learning.evaluation import (
    Pixels,
    decide_dice,
    dice_threshold,
    segmentation_metrics,
)
from radflow.learning.inference import load_network
from radflow.learning.masks import GroundTruth, load_mask
from radflow.learning.registry import champion, epoch_recorder, record_decision, register
from radflow.learning.tasks import SlidingWindow, Task
from radflow.settings import Settings
from radflow.store import ObjectStore, keys

if TYPE_CHECKING:
    from radflow.learning.training import DataSplit, Example

logger = logging.getLogger(__name__)

PROBABILITY_KEY = "probability"
"""The name under which a prediction's ``derived_keys`` hold its probability map's key."""


def window_of(task: Task) -> SlidingWindow:
    if task.window is None:
        raise ValueError(f"segmentation task {task.name} declares no sliding window (window=)")
    return task.window


@dataclass(frozen=True)
class Case:
    """A preprocessed image (C, H, W) and its ground truth."""

    image: np.ndarray
    truth: GroundTruth

    def pixels(self, probability: np.ndarray) -> Pixels:
        counted = self.truth.counted()
        return Pixels(probability[counted], self.truth.mask[counted])


def sample_patches(
    rng: np.random.Generator, case: Case, size: tuple[int, ...], count: int
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` (image, mask) patches of ``size``: half centred on a foreground pixel (when the
    mask has one), half on any pixel of the region that counts (the field of view: the black
    surround of a fundus teaches nothing). Images smaller than a patch are padded with zeros."""
    image, mask = _padded(case.image, size), _padded(case.truth.mask[None], size)[0]
    counted = case.truth.counted()
    region = _padded((counted if counted.any() else np.ones_like(counted))[None], size)[0]
    height, width = mask.shape
    centres = (np.argwhere(mask), np.argwhere(region))
    images, masks = [], []
    for i in range(count):
        pixels = centres[i % 2] if len(centres[i % 2]) else centres[1 - i % 2]
        y, x = pixels[rng.integers(len(pixels))]
        top = int(np.clip(y - size[0] // 2, 0, height - size[0]))
        left = int(np.clip(x - size[1] // 2, 0, width - size[1]))
        images.append(image[:, top : top + size[0], left : left + size[1]])
        masks.append(mask[None, top : top + size[0], left : left + size[1]])
    return np.stack(images), np.stack(masks).astype(np.float32)


def _padded(array: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    short = [max(0, s - n) for s, n in zip(size, array.shape[1:], strict=True)]
    if not any(short):
        return array
    return np.pad(array, [(0, 0), *[(0, n) for n in short]])


def inferer(window: SlidingWindow) -> SlidingWindowInferer:
    return SlidingWindowInferer(
        roi_size=window.roi_size,
        sw_batch_size=window.batch_size,
        overlap=window.overlap,
        mode=window.mode,
        sigma_scale=window.sigma_scale,
    )


@torch.no_grad()
def probability_map(
    network: nn.Module, image: np.ndarray, window: SlidingWindow, device: torch.device
) -> np.ndarray:
    """The structure's probability per pixel of a preprocessed (C, H, W) image: (H, W)."""
    network.eval()
    batch = torch.as_tensor(np.asarray(image, dtype=np.float32))[None].to(device)
    with autocast(device):
        logits = inferer(window)(batch, network)
    assert isinstance(logits, torch.Tensor)
    return torch.sigmoid(logits.float())[0, 0].cpu().numpy()


@dataclass
class SegmentationFit:
    network: nn.Module
    history: list[dict[str, float]]
    val_maps: list[np.ndarray]
    patches_per_second: float


def fit(
    task: Task,
    train: Sequence[Case],
    val: Sequence[Case],
    *,
    seed: int,
    device: torch.device,
    progress: bool = True,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> SegmentationFit:
    """Train ``task``'s network on patches; keep the epoch with the best validation Dice."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    plan, window = task.plan, window_of(task)
    network = task.build_network().to(device)
    optimiser = torch.optim.AdamW(
        network.parameters(), lr=plan.learning_rate, weight_decay=plan.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=plan.epochs)
    loss_fn = DiceCELoss(sigmoid=True)
    augment = task.augmentation()
    augment.set_random_state(seed)
    best: tuple[float, dict[str, torch.Tensor], list[np.ndarray]] | None = None
    history: list[dict[str, float]] = []
    seen, busy = 0, 0.0
    per_epoch = plan.patches_per_image * len(train)
    bar = tqdm(total=plan.epochs * per_epoch, disable=not progress, unit="patch", desc=task.name)
    for epoch in range(1, plan.epochs + 1):
        network.train()
        started, losses = time.perf_counter(), []
        patches = [sample_patches(rng, c, window.roi_size, plan.patches_per_image) for c in train]
        images = np.concatenate([p[0] for p in patches])
        masks = np.concatenate([p[1] for p in patches])
        for idx in np.array_split(
            rng.permutation(len(images)), max(1, per_epoch // plan.batch_size)
        ):
            pairs = [augment({"image": images[i], "label": masks[i]}) for i in idx]
            x = torch.stack([torch.as_tensor(p["image"]) for p in pairs]).float().to(device)
            y = torch.stack([torch.as_tensor(p["label"]) for p in pairs]).float().to(device)
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(network(x), y)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            bar.update(len(idx))
        schedule.step()
        busy += time.perf_counter() - started
        seen += per_epoch
        if epoch % plan.validate_every and epoch < plan.epochs:
            continue
        maps = [probability_map(network, c.image, window, device) for c in val]
        pixels = [c.pixels(m) for c, m in zip(val, maps, strict=True)]
        threshold = dice_threshold(pixels)
        val_dice = _pooled_dice(pixels, threshold)
        row = {
            "epoch": float(epoch),
            "train_loss": float(np.mean(losses)),
            "val_dice": val_dice,
            "val_threshold": threshold,
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_dice=f"{val_dice:.3f}")
        if on_epoch:
            on_epoch(row)
        if best is None or val_dice > best[0]:
            state = {k: v.detach().clone() for k, v in network.state_dict().items()}
            best = (val_dice, state, maps)
    bar.close()
    assert best is not None
    network.load_state_dict(best[1])
    return SegmentationFit(network.eval(), history, best[2], seen / max(busy, 1e-9))


def _pooled_dice(pixels: Sequence[Pixels], threshold: float) -> float:
    predicted = np.concatenate([p.scores >= threshold for p in pixels])
    truth = np.concatenate([p.truth for p in pixels])
    total = predicted.sum() + truth.sum()
    return float(2 * (predicted & truth).sum() / total) if total else 1.0


def evaluate(
    cases: Sequence[Case], maps: Sequence[np.ndarray], threshold: float
) -> tuple[dict[str, float], np.ndarray]:
    """Metrics of probability ``maps`` against ``cases`` (see segmentation_metrics)."""
    pixels = [c.pixels(m) for c, m in zip(cases, maps, strict=True)]
    masks = [
        ((m >= threshold) & c.truth.counted(), c.truth.mask & c.truth.counted())
        for c, m in zip(cases, maps, strict=True)
    ]
    return segmentation_metrics(pixels, masks, threshold)


def _cases(
    cache: PreprocessCache, store: ObjectStore, task: Task, examples: Sequence[Example]
) -> tuple[list[Case], CacheStats]:
    images, stats = cache.arrays(store, [CachedImage(e.sha256, e.object_key) for e in examples])
    cases = []
    for example, image in zip(examples, images, strict=True):
        if isinstance(image, Exception):
            raise image
        truth = load_mask(store, example.study_uid, task.name, example.value)
        if truth.mask.shape != image.shape[1:]:
            raise SegmentationError(
                "mask-shape",
                f"the mask of study {example.study_uid} is {truth.mask.shape} but its image is "
                f"{image.shape[1:]}; label it again with a mask of the image's size",
            )
        cases.append(Case(image, truth))
    return cases, stats


def train_and_register(
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
    """Fit, evaluate on the evaluation set, register and judge against the champion."""
    cache = PreprocessCache(settings.cache_dir, task)
    train, stats = _cases(cache, store, task, split.train)
    val, val_stats = _cases(cache, store, task, split.val)
    stats.add(val_stats)
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
    pixels = [c.pixels(m) for c, m in zip(val, result.val_maps, strict=True)]
    threshold = dice_threshold(pixels)
    metrics: dict[str, Any]
    metrics, per_study = evaluate(val, result.val_maps, threshold)
    metrics["train_patches_per_second"] = result.patches_per_second
    metrics["data_seconds"] = stats.seconds
    with unit_of_work(session_factory) as session:
        finished = session.get_one(TrainingRun, run_id)
        finished.status, finished.finished_at = "completed", utcnow()
        finished.history = {"epochs": history, "data_loading": {"seconds": stats.seconds}}
        current = champion(session, task.name)
        champion_dice = None
        if current is not None:
            old = load_network(store, current, device)
            old_maps = [probability_map(old, c.image, window_of(task), device) for c in val]
            champion_dice = evaluate(val, old_maps, current.threshold)[1]
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
        decision = decide_dice(per_study, champion_dice, settings.promotion_alpha)
        record_decision(
            session,
            version,
            current,
            decision,
            len(val),
            alpha=settings.promotion_alpha,
            actor=actor,
        )
    return version


def segment_studies(
    store: ObjectStore,
    task: Task,
    version: ModelVersion,
    network: nn.Module,
    device: torch.device,
    studies: Sequence[tuple[str, str]],
    images: Sequence[np.ndarray],
) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Each study's score (its highest pixel probability) and derived objects: the probability
    map and, unless the mask at the version's threshold is empty, its DICOM SEG.

    ``studies``: (StudyInstanceUID, object key of the routed image) in the order of ``images``.
    A SEG that cannot be written is named in ``derived_keys["seg_error"]`` with its reason; the
    study keeps its probability map and is scored.
    """
    window = window_of(task)
    algorithm = Algorithm.for_model(task.name, version.version)
    scores, derived = [], []
    for (study_uid, object_key), image in zip(studies, images, strict=True):
        # As stored (float16), so the SEG is exactly the stored map at the threshold.
        probability = probability_map(network, image, window, device)
        probability = probability.astype(np.float16).astype(np.float32)
        out = {PROBABILITY_KEY: _save_map(store, study_uid, task, version, probability)}
        try:
            stored = write_segmentation(
                store,
                load_sources(store, [object_key]),
                probability >= version.threshold,
                task.coding.segments,
                algorithm,
                task=task.name,
                version=version.version,
            )
            out[SEG_KEY] = stored.key
        except SegmentationError as exc:
            logger.info("study %s: no SEG (%s): %s", study_uid, exc.reason, exc)
            out["seg_error"] = exc.reason
        scores.append(float(probability.max()))
        derived.append(out)
    return np.asarray(scores, dtype=np.float32), derived


def _save_map(
    store: ObjectStore, study_uid: str, task: Task, version: ModelVersion, probability: np.ndarray
) -> str:
    key = keys.derived(study_uid, task.name, version.version, "probability.npy")
    buffer = io.BytesIO()
    np.save(buffer, probability.astype(np.float16))
    store.put_bytes(key, buffer.getvalue(), content_type="application/octet-stream")
    return key


def load_probability(store: ObjectStore, key: str) -> np.ndarray:
    """A stored probability map (H, W), float32."""
    return np.asarray(np.load(io.BytesIO(store.get_bytes(key))), dtype=np.float32)
