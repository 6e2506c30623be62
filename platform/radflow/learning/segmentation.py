"""The segmentation kinds, 2D and 3D: masks -> a MONAI U-Net -> sliding-window masks as DICOM SEG.

One code path for both: ``segmentation`` takes one image (C, H, W), ``segmentation-3d`` a series
assembled into a volume (C, D, H, W; radflow.dicom.volume, in stack order); the spatial
dimensions come from the task's window and network.

Training draws patches of the task's window size from each training image (half centred on a
pixel of the structure, half on any pixel of the region that counts), augments them, and fits
the network with Dice + cross entropy. Validation, scoring and the champion comparison all see
whole images through MONAI's ``SlidingWindowInferer`` (overlap and Gaussian weighting from the
task's ``SlidingWindow``).
Evaluation counts the pixels inside each study's region (DRIVE's field of view) only: Dice, HD95
and pixel AUC; the threshold is the one with the best Dice on the evaluation set; a version
replaces the champion only on a paired per-study Dice test (radflow.learning.evaluation).

Scoring writes each study's map (``derived_keys["probability"]``): for an image its
probability map (float16 .npy); for a volume the mask at the version's threshold as a label map
with the volume's affine (``labels.npz``, radflow.learning.heatmaps.label_volume: a float map
of a 512x512x200 CT would take 100 MB a study), which the volume viewer draws over the series.
The mask at the threshold becomes a DICOM SEG (``derived_keys["seg"]``) over the source
instances (one frame per slice that holds the structure, for a volume), which delivery reports
in an SR (area, or volume in mm^3) and sends on.
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
from radflow.learning.cache import CacheStats, PreprocessCache
from radflow.learning.device import autocast, cpu_threads, select_device
from radflow.learning.evaluation import (
    Pixels,
    decide_dice,
    dice_threshold,
    segmentation_metrics,
)
from radflow.learning.heatmaps import label_volume, read_label_volume
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
    """A preprocessed image (C, H, W) or volume (C, D, H, W) and its ground truth."""

    image: np.ndarray
    truth: GroundTruth

    def pixels(self, probability: np.ndarray) -> Pixels:
        counted = self.truth.counted()
        return Pixels(probability[counted], self.truth.mask[counted])


def sample_patches(
    rng: np.random.Generator, case: Case, size: tuple[int, ...], count: int
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` (image, mask) patches of ``size`` (2D or 3D): half centred on a foreground
    pixel (when the mask has one), half on any pixel of the region that counts (the field of
    view: the black surround of a fundus teaches nothing). Images smaller than a patch are
    padded with zeros."""
    image, mask = _padded(case.image, size), _padded(case.truth.mask[None], size)[0]
    if case.truth.region is not None and case.truth.region.any():
        anywhere = np.argwhere(_padded(case.truth.region[None], size)[0])
    else:
        anywhere = None  # every pixel counts: drawn uniformly, not listed (a CT has millions)
    structure = np.argwhere(mask)
    images, masks = [], []
    for i in range(count):
        if i % 2 == 0 and len(structure):
            centre = structure[rng.integers(len(structure))]
        elif anywhere is not None:
            centre = anywhere[rng.integers(len(anywhere))]
        else:
            centre = np.array([rng.integers(n) for n in mask.shape])
        window = tuple(
            slice(start, start + s)
            for start, s in (
                (int(np.clip(c - s // 2, 0, n - s)), s)
                for c, s, n in zip(centre, size, mask.shape, strict=True)
            )
        )
        images.append(image[(slice(None), *window)])
        masks.append(mask[window][None])
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
    """The structure's probability per pixel of a preprocessed (C, *spatial) image or volume:
    (*spatial)."""
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
    images, stats = cache.arrays(store, [e.cached() for e in examples])
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


@dataclass(frozen=True)
class Target:
    """A study to segment: its UID, the stored instances its input comes from (one image, or a
    series' slices in stack order: the SEG's source frames), and for a volume where its voxels
    lie (4x4, voxel index to LPS mm; the viewer places the label map with it)."""

    study_uid: str
    sources: tuple[str, ...]
    affine: np.ndarray | None = None


def segment_studies(
    store: ObjectStore,
    task: Task,
    version: ModelVersion,
    network: nn.Module,
    device: torch.device,
    targets: Sequence[Target],
    images: Sequence[np.ndarray],
) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Each study's score (its highest pixel probability) and derived objects: its map (see the
    module doc) and, unless the mask at the version's threshold is empty, its DICOM SEG.

    A SEG that cannot be written is named in ``derived_keys["seg_error"]`` with its reason; the
    study keeps its map and is scored.
    """
    window = window_of(task)
    algorithm = Algorithm.for_model(task.name, version.version)
    scores, derived = [], []
    for target, image in zip(targets, images, strict=True):
        probability = probability_map(network, image, window, device)
        mask, key = _store_map(store, target, task, version, probability)
        out = {PROBABILITY_KEY: key}
        try:
            stored = write_segmentation(
                store,
                load_sources(store, target.sources),
                mask,
                task.coding.segments,
                algorithm,
                task=task.name,
                version=version.version,
            )
            out[SEG_KEY] = stored.key
        except SegmentationError as exc:
            logger.info("study %s: no SEG (%s): %s", target.study_uid, exc.reason, exc)
            out["seg_error"] = exc.reason
        scores.append(float(probability.max()))
        derived.append(out)
    return np.asarray(scores, dtype=np.float32), derived


def _store_map(
    store: ObjectStore, target: Target, task: Task, version: ModelVersion, probability: np.ndarray
) -> tuple[np.ndarray, str]:
    """Store the study's map; the mask at the threshold (exactly what the stored map gives)."""
    if probability.ndim == 3:
        mask = probability >= version.threshold
        key = keys.derived(target.study_uid, task.name, version.version, LABELS_NAME)
        data = label_volume(mask.view(np.uint8), target.affine)
        store.put_bytes(key, data, content_type="application/octet-stream")
        return mask, key
    # As stored (float16), so the SEG is exactly the stored map at the threshold.
    probability = probability.astype(np.float16)
    key = keys.derived(target.study_uid, task.name, version.version, "probability.npy")
    buffer = io.BytesIO()
    np.save(buffer, probability)
    store.put_bytes(key, buffer.getvalue(), content_type="application/octet-stream")
    return probability.astype(np.float32) >= version.threshold, key


LABELS_NAME = "labels.npz"
"""A volume's stored label map (its suffix is how radflow.services.study_view knows volumes)."""


def load_probability(store: ObjectStore, key: str) -> np.ndarray:
    """A stored probability map (H, W), float32."""
    return np.asarray(np.load(io.BytesIO(store.get_bytes(key))), dtype=np.float32)


def load_predicted_mask(store: ObjectStore, key: str, threshold: float) -> np.ndarray:
    """The mask a prediction's stored map gives at ``threshold``: an image's probability map
    thresholded, or a volume's label map (already the mask at its version's threshold).
    ValueError for bytes that are neither."""
    if key.endswith(LABELS_NAME):
        labels, _ = read_label_volume(store.get_bytes(key))
        return np.asarray(labels > 0)
    return np.asarray(load_probability(store, key) >= threshold)
