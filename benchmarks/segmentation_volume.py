"""Sliding-window scoring of a CT volume through the process flow against bare MONAI.

    python benchmarks/segmentation.py --volume [--slices 200] [--size 512]

In a fresh data directory (SQLite, local object folder): trains ct-lesions briefly on small
synthetic lesion volumes (a setup step: the model has to find lesions for the SEG to hold
frames; its plan shortened and its patches 16 voxels wide, as the tests train it; the network is
fully convolutional, and everything measured uses the task's own sliding window), then writes a
``--slices`` x ``--size`` x ``--size`` synthetic CT with lesions (demo.synthetic_ct.lesion_case)
and ingests it. Timed, in this order:

- bare: MONAI ``sliding_window_inference`` on the same preprocessed tensor with the same network
  (the champion's weights), the task's roi size, overlap, Gaussian weighting and window batch;
- flow: the process flow (store read, volume assembly, preprocessing, sliding-window inference,
  the label map and the multi-frame DICOM SEG written and stored), then the deliver flow (the SR
  with the lesion volume, stored);
- bare again. The machine's speed drifts (a shared 2-core VM: one bare run took 18 s, the next
  38 s); the ratio takes the faster bare run, the figure least kind to Radflow.

Ratio = bare seconds / flow seconds (floor 0.6x, goal 0.85x). Prints a table; the last line is
one JSON object. Peak RSS is the process's (VmHWM), training included.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

TASK = "ct-lesions"
TRAIN_CASES, TRAIN_SLICES, TRAIN_SIZE = 8, 32, 128


def _environment(work: Path) -> None:
    for name in ("RADFLOW_DATABASE_URL", "RADFLOW_STORE_URL", "RADFLOW_INBOX_DIR"):
        os.environ.pop(name, None)
    os.environ["RADFLOW_DATA_DIR"] = str(work / "data")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def _train_quickly(settings: Any, work: Path, seed: int) -> Any:
    """A champion trained in a minute or two (setup, see the module doc); the task as declared
    again afterwards."""
    from demo.synthetic_ct import write_lesion_dataset
    from radflow.ingest.msd import import_segmentation
    from radflow.learning import tasks
    from radflow.learning.tasks import SlidingWindow
    from radflow.learning.training import train_task
    from radflow.runtime import Runtime

    task = tasks.get_task(TASK)
    plan = dataclasses.replace(
        task.plan,
        epochs=6,
        batch_size=8,
        learning_rate=1e-2,
        patches_per_image=32,
        val_fraction=0.25,
        validate_every=3,
    )
    window = SlidingWindow(roi_size=(16, 16, 16), overlap=0.25, batch_size=8)
    tasks.TASKS[TASK] = dataclasses.replace(task, plan=plan, window=window)
    write_lesion_dataset(
        work / "train", TRAIN_CASES, slices=TRAIN_SLICES, size=TRAIN_SIZE, seed=seed
    )
    try:
        with Runtime.open(settings) as rt:
            import_segmentation(settings, rt.session_factory, rt.store, work / "train", TASK)
            return train_task(settings, rt.session_factory, rt.store, TASK, progress=False)
    finally:
        tasks.TASKS[TASK] = task


def _bare(network: Any, tensor: Any, threads: int | None) -> float:
    """Seconds of bare MONAI sliding_window_inference over ``tensor`` (1, C, D, H, W), on as many
    threads as the flow's scoring (RADFLOW_TORCH_THREADS)."""
    import torch
    from monai.inferers import sliding_window_inference

    from radflow.learning.device import cpu_threads
    from radflow.learning.tasks import get_task

    window = get_task(TASK).window
    assert window is not None
    started = time.perf_counter()
    with torch.no_grad(), cpu_threads(threads):
        sliding_window_inference(
            tensor,
            window.roi_size,
            window.batch_size,
            network,
            overlap=window.overlap,
            mode=window.mode,
            sigma_scale=window.sigma_scale,
        )
    return time.perf_counter() - started


def _big_series(work: Path, slices: int, size: int, seed: int) -> tuple[Path, np.ndarray]:
    from demo.synthetic_ct import lesion_case, write_ct_series

    hu, mask = lesion_case(
        np.random.default_rng(seed + 1), slices, size, lesions=(3, 5), radius=(3.0, 8.0)
    )
    folder = work / "big"
    write_ct_series(folder / "case", hu, patient_id="BENCH-LESIONS")
    (folder / "dataset.json").write_text(json.dumps({"test": [{"image": "case"}]}))
    return folder, mask


def run(*, slices: int, size: int, seed: int) -> int:
    work = Path(tempfile.mkdtemp(prefix="radflow-segmentation-volume-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    _environment(work)

    import torch
    from sqlalchemy import select

    from flows.deliver import deliver_flow
    from flows.process import process_flow
    from radflow.db import Study
    from radflow.dicom.volume import load_volume
    from radflow.ingest.msd import import_segmentation
    from radflow.ingest.routing import route_studies
    from radflow.learning.inference import load_network
    from radflow.learning.registry import require_champion
    from radflow.learning.tasks import get_task
    from radflow.runtime import Runtime
    from radflow.settings import Settings

    settings = Settings()
    started = time.perf_counter()
    version = _train_quickly(settings, work, seed)
    setup = time.perf_counter() - started
    print(f"trained {version.name} in {setup:.0f} s (Dice {version.metrics['dice']:.3f})")
    # The first flow run starts Prefect's temporary server, and the training studies get
    # scored and reported: not timed.
    process_flow(TASK)
    deliver_flow()

    folder, truth = _big_series(work, slices, size, seed)
    with Runtime.open(settings) as rt:
        report = import_segmentation(
            settings, rt.session_factory, rt.store, folder, TASK, which="test", unlabeled=True
        )
        with rt.session_factory() as session:
            champion = require_champion(session, TASK)
            study_id = session.scalars(
                select(Study.id).where(Study.study_uid == report.study_uids[0])
            ).one()
            plan = route_studies(session, [study_id], get_task(TASK))[study_id].plan
        assert plan is not None
        network = load_network(rt.store, champion, torch.device("cpu")).eval()
        tensor = get_task(TASK).preprocessing()(load_volume(rt.store, plan).meta_tensor())
    tensor = torch.as_tensor(np.asarray(tensor, dtype=np.float32))[None]
    print(
        f"CT {tuple(tensor.shape[2:])} (slices, rows, columns); torch threads "
        f"{settings.torch_threads or torch.get_num_threads()} (RADFLOW_TORCH_THREADS)",
        flush=True,
    )

    threads = settings.torch_threads or None
    bare = [_bare(network, tensor, threads)]
    del tensor
    started = time.perf_counter()
    processed = process_flow(TASK)
    scored_at = time.perf_counter()
    delivered = deliver_flow()
    flow = time.perf_counter() - started
    bare.append(_bare(network, load_tensor_again(settings, plan), threads))
    result = _result(slices, size, bare, flow, scored_at - started, processed, delivered, truth)
    result["dice_vs_truth"], result["predicted_voxels"] = _dice(settings, study_id, truth)
    result["setup_seconds"] = round(setup, 1)
    result["torch_threads"] = threads
    _table(result)
    print(json.dumps(result))
    return 0


def load_tensor_again(settings: Any, plan: Any) -> Any:
    import torch

    from radflow.dicom.volume import load_volume
    from radflow.learning.tasks import get_task
    from radflow.runtime import Runtime

    with Runtime.open(settings) as rt:
        tensor = get_task(TASK).preprocessing()(load_volume(rt.store, plan).meta_tensor())
    return torch.as_tensor(np.asarray(tensor, dtype=np.float32))[None]


def _dice(settings: Any, study_id: int, truth: np.ndarray) -> tuple[float, int]:
    """Dice of the stored mask against the generated lesions (a sanity figure: the model was
    trained for a minute). The series was written feet first; highdicom stacks it head first."""
    from sqlalchemy import select

    from radflow.db import ModelVersion, Prediction
    from radflow.learning.evaluation import dice
    from radflow.learning.segmentation import PROBABILITY_KEY, load_predicted_mask
    from radflow.runtime import Runtime

    with Runtime.open(settings) as rt, rt.session_factory() as session:
        keys, threshold = session.execute(
            select(Prediction.derived_keys, ModelVersion.threshold)
            .join(ModelVersion, ModelVersion.id == Prediction.model_version_id)
            .where(Prediction.study_id == study_id)
        ).one()
        mask = load_predicted_mask(rt.store, keys[PROBABILITY_KEY], threshold)
    return round(dice(mask, truth[::-1]), 4), int(mask.sum())


def _result(
    slices: int,
    size: int,
    bare: list[float],
    flow: float,
    process: float,
    processed: dict[str, Any],
    delivered: dict[str, Any],
    truth: np.ndarray,
) -> dict[str, Any]:
    scored = processed["tasks"][TASK]
    fastest = float(min(bare))
    return {
        "shape": [slices, size, size],
        "bare_seconds": [round(b, 2) for b in bare],
        "flow_seconds": round(flow, 2),
        "process_seconds": round(process, 2),
        "scoring_network_seg_seconds": round(float(scored["network_seconds"]), 2),
        "deliver_seconds": round(flow - process, 2),
        "ratio": round(fastest / flow, 3),
        "floor": 0.6,
        "goal": 0.85,
        "scored": scored["scored"],
        "reports": delivered["reports"],
        "truth_voxels": int(truth.sum()),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _table(result: dict[str, Any]) -> None:
    rows = [
        ("volume (slices x rows x columns)", "x".join(str(n) for n in result["shape"])),
        ("bare MONAI sliding_window_inference (s)", ", ".join(map(str, result["bare_seconds"]))),
        ("process flow + deliver flow (s)", result["flow_seconds"]),
        ("  of it scoring (process flow)", result["process_seconds"]),
        ("    of it network + label map + SEG", result["scoring_network_seg_seconds"]),
        ("  of it SR (deliver flow)", result["deliver_seconds"]),
        ("ratio faster bare / flow (floor 0.6, goal 0.85)", f"{result['ratio']:.3f}x"),
        ("Dice of the stored mask vs the lesions drawn", result["dice_vs_truth"]),
        ("voxels: predicted / drawn", f"{result['predicted_voxels']} / {result['truth_voxels']}"),
        ("peak RSS (MB)", result["peak_rss_mb"]),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
