"""Accuracy of the platform's own train flow on a held-out split, end to end.

    python benchmarks/accuracy.py [--task T] --train-npz A.npz --test-npz B.npz [--test-split test]
    python benchmarks/accuracy.py [--task T] --train-npz A.npz --carve 0.1

``--task``: pneumonia-cxr (default, 2D images), or a task on volumes (adrenal-ct-3d,
adrenal-ct-seq: MedMNIST 3D volumes, each imported as a CT series).

In a fresh data directory: imports A's train and val splits with their labels (the normal import
path: DICOM studies through ingest), trains through the train flow (selection and threshold on
val only), imports B's test split as unlabeled studies, scores them through the process flow,
and compares the stored predictions with B's labels at the model's stored threshold.

``--carve F`` holds out a fraction F of A's train split as the test split instead (written to a
temporary npz in the MedMNIST layout), for measuring without the official test split.

The last line printed is one JSON object: auc, acc, sensitivity, specificity, train_seconds, ...
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


def carve(train_npz: Path, fraction: float, seed: int, out_dir: Path) -> tuple[Path, Path]:
    """(train+val npz without the held-out images, npz whose test split is the held-out part)."""
    with np.load(train_npz) as data:
        arrays = {k: np.asarray(data[k]) for k in data.files}
    rng = np.random.default_rng(seed)
    n = len(arrays["train_images"])
    held = np.zeros(n, dtype=bool)
    held[rng.permutation(n)[: round(n * fraction)]] = True
    rest = dict(arrays)
    rest["train_images"], rest["train_labels"] = (
        arrays["train_images"][~held],
        arrays["train_labels"][~held],
    )
    train_path, test_path = out_dir / "carved_trainval.npz", out_dir / "carved_test.npz"
    np.savez_compressed(train_path, **rest)
    np.savez_compressed(
        test_path,
        test_images=arrays["train_images"][held],
        test_labels=arrays["train_labels"][held],
    )
    return train_path, test_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="pneumonia-cxr")
    parser.add_argument("--train-npz", type=Path, required=True)
    parser.add_argument("--test-npz", type=Path)
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--carve", type=float, default=None, help="hold out this train fraction")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.test_npz is None and args.carve is None:
        parser.error("give --test-npz, or --carve FRACTION to hold out part of the train split")

    work = Path(tempfile.mkdtemp(prefix="radflow-accuracy-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # gigabytes of images
    # A fresh platform: every RADFLOW_* location points into the temporary folder.
    for name in ("RADFLOW_DATABASE_URL", "RADFLOW_STORE_URL", "RADFLOW_INBOX_DIR"):
        os.environ.pop(name, None)
    os.environ["RADFLOW_DATA_DIR"] = str(work / "data")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from sqlalchemy import select

    from flows.process import process_flow
    from flows.train import train_flow
    from radflow.db import ModelVersion, Prediction, Study
    from radflow.ingest.importers import import_npz, read_npz
    from radflow.learning.evaluation import evaluate
    from radflow.learning.registry import require_champion
    from radflow.learning.tasks import get_task
    from radflow.runtime import Runtime
    from radflow.settings import Settings

    train_npz, test_npz, test_split = args.train_npz, args.test_npz, args.test_split
    if args.carve is not None:
        train_npz, test_npz = carve(args.train_npz, args.carve, args.seed, work)
        test_split = "test"
    task = get_task(args.task).name
    settings = Settings()
    started = time.perf_counter()
    with Runtime.open(settings) as rt:
        report = import_npz(
            settings, rt.session_factory, rt.store, train_npz, task, splits=["train", "val"]
        )
    import_seconds = time.perf_counter() - started
    print(f"imported {report.summary()} in {import_seconds:.0f} s", flush=True)

    started = time.perf_counter()
    trained = train_flow(task, progress=sys.stderr.isatty(), score_waiting=False)
    train_seconds = time.perf_counter() - started
    print(f"trained {trained['model']} in {train_seconds:.0f} s: val AUC {trained['auc']:.4f}")

    with Runtime.open(settings) as rt:
        test = import_npz(
            settings,
            rt.session_factory,
            rt.store,
            test_npz,
            task,
            splits=[test_split],
            unlabeled=True,
        )
    started = time.perf_counter()
    scored = process_flow(task)
    score_seconds = time.perf_counter() - started
    print(f"scored {scored['scored']} studies in {score_seconds:.0f} s")

    _, parts = read_npz(test_npz, [test_split], volumes=get_task(task).takes_series)
    assert parts[0].labels is not None, f"{test_npz} has no {test_split}_labels to compare with"
    truth = dict(zip(test.study_uids, parts[0].labels.astype(float), strict=True))
    with Runtime.open(settings) as rt, rt.session_factory() as session:
        champion: ModelVersion = require_champion(session, task)
        rows = session.execute(
            select(Study.study_uid, Prediction.score)
            .join(Prediction, Prediction.study_id == Study.id)
            .where(Prediction.model_version_id == champion.id)
            .where(Study.study_uid.in_(list(truth)))
        ).all()
        threshold = champion.threshold
    scores = dict(rows)
    uids = [u for u in test.study_uids if u in scores]
    targets = np.array([truth[u] for u in uids])
    metrics = evaluate(targets, np.array([scores[u] for u in uids]), threshold)
    result = {
        "task": task,
        "auc": round(metrics["auc"], 4),
        "acc": round(metrics["accuracy"], 4),
        "sensitivity": round(metrics["sensitivity"], 4),
        "specificity": round(metrics["specificity"], 4),
        "ece": round(metrics["ece"], 4),
        "threshold": round(threshold, 4),
        "n_test": len(uids),
        "val_auc": round(float(trained["auc"]), 4),
        "import_seconds": round(import_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "score_seconds": round(score_seconds, 1),
    }
    print(
        f"test: AUC {result['auc']:.4f}  ACC {result['acc']:.4f}  sensitivity "
        f"{result['sensitivity']:.4f}  specificity {result['specificity']:.4f}  "
        f"(threshold {threshold:.3f}, {len(uids)} studies)"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
