"""Segmentation through the platform's own flows: vessels on a held-out set (DRIVE), or the
speed of sliding-window scoring of a CT volume (``--volume``).

    python benchmarks/segmentation.py --train-dir ../shared/data/drive --test-dir DIR
    python benchmarks/segmentation.py --train-dir ../shared/data/drive --carve 5
    python benchmarks/segmentation.py --volume [--slices 200] [--size 512]

``--volume`` (benchmarks/segmentation_volume.py): a synthetic 512x512x200 CT with lesions scored
by ct-lesions through the process flow against bare MONAI ``sliding_window_inference``.

Both folders hold a ``dataset.json`` (Medical Segmentation Decathlon layout; the test one a
``test`` list with the same fields: image, label, fov). In a fresh data directory: imports the
training list with its masks (``radflow import segmentation``), trains through the train flow
(selection and threshold on the task's evaluation set, carved from training), imports the test
images as unlabelled studies, scores them through the process flow (probability map + DICOM
SEG), and compares with the test masks on field-of-view pixels: Dice (F1) from the stored SEG
(the model's stored threshold), pixel AUC from the stored probability maps.

``--carve N`` holds out N images of the training list as the test set instead (the DRIVE test
part is not on this machine; never select on it).

The last line printed is one JSON object: dice, auc, acc, sensitivity, specificity, train_seconds.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def carve(train_dir: Path, count: int, seed: int, out_dir: Path) -> tuple[Path, Path]:
    """Two folders with a dataset.json: the training list without ``count`` images, and those
    images as a ``test`` list (paths point into ``train_dir``)."""
    entries = json.loads((train_dir / "dataset.json").read_text())["training"]
    absolute = [{k: str((train_dir / v).resolve()) for k, v in e.items()} for e in entries]
    held = set(np.random.default_rng(seed).permutation(len(absolute))[:count].tolist())
    train, test = out_dir / "carved-train", out_dir / "carved-test"
    for folder, key, chosen in ((train, "training", False), (test, "test", True)):
        folder.mkdir(parents=True)
        items = [e for i, e in enumerate(absolute) if (i in held) == chosen]
        (folder / "dataset.json").write_text(json.dumps({key: items}, indent=1))
    return train, test


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-dir", type=Path)
    parser.add_argument("--test-dir", type=Path)
    parser.add_argument("--carve", type=int, default=None, help="hold out N training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--volume", action="store_true", help="CT volume scoring speed instead")
    parser.add_argument("--slices", type=int, default=200, help="--volume: slices of the CT")
    parser.add_argument("--size", type=int, default=512, help="--volume: rows and columns")
    args = parser.parse_args()
    if args.volume:
        from segmentation_volume import run

        return run(slices=args.slices, size=args.size, seed=args.seed)
    if args.train_dir is None:
        parser.error("give --train-dir (DRIVE), or --volume")
    if args.test_dir is None and args.carve is None:
        parser.error("give --test-dir, or --carve N to hold out N training images")

    work = Path(tempfile.mkdtemp(prefix="radflow-segmentation-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # gigabytes of images
    for name in ("RADFLOW_DATABASE_URL", "RADFLOW_STORE_URL", "RADFLOW_INBOX_DIR"):
        os.environ.pop(name, None)
    os.environ["RADFLOW_DATA_DIR"] = str(work / "data")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary Prefect server can take over the default 20 s to start on a busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

    from sqlalchemy import select

    from flows.process import process_flow
    from flows.train import train_flow
    from radflow.db import Prediction, Study
    from radflow.dicom.seg import SEG_KEY, load_sources, read_segmentation
    from radflow.ingest.msd import import_segmentation, read_dataset
    from radflow.learning.evaluation import binary_metrics, dice
    from radflow.learning.masks import GroundTruth
    from radflow.learning.registry import require_champion
    from radflow.learning.segmentation import PROBABILITY_KEY, load_probability
    from radflow.runtime import Runtime
    from radflow.settings import Settings

    train_dir, test_dir = args.train_dir, args.test_dir
    if args.carve is not None:
        train_dir, test_dir = carve(args.train_dir, args.carve, args.seed, work)
    task = "retina-vessels"
    settings = Settings()
    started = time.perf_counter()
    with Runtime.open(settings) as rt:
        report = import_segmentation(settings, rt.session_factory, rt.store, train_dir, task)
    import_seconds = time.perf_counter() - started
    print(f"imported {report.summary()} in {import_seconds:.0f} s", flush=True)

    started = time.perf_counter()
    trained = train_flow(task, progress=sys.stderr.isatty(), score_waiting=False)
    train_seconds = time.perf_counter() - started
    print(
        f"trained {trained['model']} in {train_seconds:.0f} s: evaluation-set Dice "
        f"{trained['dice']:.4f}, AUC {trained['auc']:.4f}",
        flush=True,
    )

    with Runtime.open(settings) as rt:
        test = import_segmentation(
            settings, rt.session_factory, rt.store, test_dir, task, which="test", unlabeled=True
        )
    started = time.perf_counter()
    scored = process_flow(task)
    score_seconds = time.perf_counter() - started
    print(f"scored {scored['scored']} studies in {score_seconds:.0f} s", flush=True)

    from PIL import Image

    def truth_of(path: Path | None, fov: Path | None) -> GroundTruth:
        assert path is not None, f"{test_dir}/dataset.json gives no label to compare with"
        mask = np.asarray(Image.open(path).convert("L")) > 0
        region = np.asarray(Image.open(fov).convert("L")) > 0 if fov else None
        return GroundTruth(mask, region)

    truths = {
        uid: truth_of(case.label, case.fov)
        for uid, case in zip(test.study_uids, read_dataset(test_dir, "test"), strict=True)
    }
    probabilities, masks, targets, rows_out = [], [], [], []
    with Runtime.open(settings) as rt, rt.session_factory() as session:
        champion = require_champion(session, task)
        found = session.execute(
            select(Study, Prediction)
            .join(Prediction, Prediction.study_id == Study.id)
            .where(Prediction.model_version_id == champion.id)
            .where(Study.study_uid.in_(list(truths)))
        ).all()
        for study, prediction in found:
            truth = truths[study.study_uid]
            region = truth.counted()
            keys = prediction.derived_keys
            probability = load_probability(rt.store, keys[PROBABILITY_KEY])
            sources = load_sources(rt.store, [study.series[0].instances[0].object_key])
            seg = read_segmentation(rt.store.get_bytes(keys[SEG_KEY]), sources)
            predicted = seg.foreground()[0, ..., 0]
            probabilities.append(probability[region])
            masks.append(predicted[region])
            targets.append(truth.mask[region])
            rows_out.append((study.study_uid[-12:], dice(predicted[region], truth.mask[region])))
        threshold = champion.threshold
    truth_pixels, predicted_pixels = np.concatenate(targets), np.concatenate(masks)
    pooled = binary_metrics(truth_pixels, np.concatenate(probabilities), threshold)
    at_seg = binary_metrics(truth_pixels, predicted_pixels.astype(np.float32), 0.5)
    result = {
        "dice": round(dice(predicted_pixels, truth_pixels), 4),
        "auc": round(pooled["auc"], 4),
        "acc": round(at_seg["accuracy"], 4),
        "sensitivity": round(at_seg["sensitivity"], 4),
        "specificity": round(at_seg["specificity"], 4),
        "threshold": round(threshold, 4),
        "n_test": len(rows_out),
        "eval_set_dice": round(float(trained["dice"]), 4),
        "import_seconds": round(import_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "score_seconds": round(score_seconds, 1),
    }
    print("study          Dice (FOV)")
    for uid, value in rows_out:
        print(f"...{uid}  {value:.4f}")
    print(
        f"test: Dice {result['dice']:.4f}  AUC {result['auc']:.4f}  ACC {result['acc']:.4f}  "
        f"sensitivity {result['sensitivity']:.4f}  specificity {result['specificity']:.4f}  "
        f"(threshold {threshold:.3f}, {len(rows_out)} images)"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
