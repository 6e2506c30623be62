"""What the platform costs on top of the compute: training, scoring and the preprocessing cache.

    python benchmarks/overhead.py [--npz ../shared/data/pneumoniamnist_trainval.npz] [--n 1500]

In a fresh data directory, side by side in one run:

1. training throughput (images/s) of the train flow (a retrain, so the cache is warm) vs a plain
   MONAI/PyTorch loop with the same network, batch size, transforms and per-epoch validation;
2. batch scoring through the process flow, timed end to end (a Prefect flow run: pending
   studies from the database, routing, preprocessed tensors, the network, predictions and
   triage written, Grad-CAM maps stored) vs the bare model forward (``predict``, same threads
   and batch size) on the same preprocessed tensors, in studies (images) per second:
   - ``score_flow_per_s``: the goal's figure. The studies were trained on, so their tensors are
     in the preprocessing cache, as they are in use the other way round (scoring fills the
     cache; the labelled studies a retrain reads were scored first);
   - ``score_flow_gradcam_per_s``: the same with a Grad-CAM map per study (after a promotion,
     so every study is pending again);
   - ``score_flow_cold_per_s``: the same with an empty cache (every DICOM decoded), after
     registering the champion's weights again as a new version;
   - ``score_flow_task_s`` / ``score_flow_network_s``: of the first run's wall time, the
     seconds inside the scoring task, and of those, in the network (``predict``) alone;
   - ``score_flow_run_overhead_s``: a process flow run with nothing to score: what a run
     costs whatever its size, mostly Prefect's (API calls, and joining its heartbeat thread,
     which sleeps in 1 s steps: 0-1 s at the end of every run, ~1 s for a short one). Not
     subtracted from anything: in a run that scores, that wait is anywhere from 0 to 1 s;
3. data-loading time of the second training vs the first (the preprocessing cache).

The last line is one JSON object with the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def _subset(npz: Path, n: int, out: Path) -> Path:
    """The first n train images and n/5 val images, as a MedMNIST npz."""
    with np.load(npz) as data:
        arrays = {
            "train_images": data["train_images"][:n],
            "train_labels": data["train_labels"][:n],
            "val_images": data["val_images"][: n // 5],
            "val_labels": data["val_labels"][: n // 5],
        }
    np.savez(out, **arrays)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--npz",
        type=Path,
        default=Path(__file__).parents[2] / "shared/data/pneumoniamnist_trainval.npz",
    )
    parser.add_argument("--n", type=int, default=1500, help="train images (val: n/5)")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="radflow-overhead-"))
    for name in ("RADFLOW_DATABASE_URL", "RADFLOW_STORE_URL", "RADFLOW_INBOX_DIR"):
        os.environ.pop(name, None)
    os.environ["RADFLOW_DATA_DIR"] = str(work / "data")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    import dataclasses
    import shutil

    import torch
    from sqlalchemy import select

    from flows.process import process_flow
    from flows.train import train_flow
    from radflow import tasks
    from radflow.cache import CachedImage, PreprocessCache
    from radflow.db import Instance, ModelVersion, TrainingRun, unit_of_work
    from radflow.device import cpu_threads, select_device
    from radflow.importers import import_npz
    from radflow.registry import load_network, promote, register, require_champion
    from radflow.runtime import Runtime
    from radflow.settings import Settings
    from radflow.training import predict

    name = "pneumonia-cxr"
    base = tasks.get_task(name)
    task = dataclasses.replace(base, plan=dataclasses.replace(base.plan, epochs=args.epochs))
    tasks.TASKS[name] = task  # the same plan for the flow and the plain loop
    settings = Settings()
    device = select_device()
    threads = settings.torch_threads or None
    with Runtime.open(settings) as rt:
        report = import_npz(
            settings, rt.session_factory, rt.store, _subset(args.npz, args.n, work / "s.npz"), name
        )
    print(f"imported {report.summary()}", flush=True)

    def run_stats(version_name: str) -> tuple[float, int]:
        with Runtime.open(settings) as rt, rt.session_factory() as session:
            number = int(version_name.rsplit(":v", 1)[1])
            version = session.scalars(
                select(ModelVersion).where(
                    ModelVersion.task == name, ModelVersion.version == number
                )
            ).one()
            run = session.get_one(TrainingRun, version.training_run_id)
            return float(run.history["data_loading"]["seconds"]), int(run.params["n_train"])

    first = train_flow(name, progress=False)
    data_first, n_train = run_stats(first["model"])
    started = time.perf_counter()
    second = train_flow(name, progress=False)
    flow_seconds = time.perf_counter() - started
    data_second, _ = run_stats(second["model"])
    flow_ips = n_train * args.epochs / flow_seconds
    print(
        f"train flow (warm cache): {flow_ips:.1f} img/s; "
        f"data loading {data_first:.1f} s -> {data_second:.2f} s"
    )

    # The plain loop: the same tensors in memory, the same fit loop body written out by hand.
    with Runtime.open(settings) as rt, rt.session_factory() as session:
        images = session.execute(select(Instance.sha256, Instance.object_key)).all()
        cache = PreprocessCache(settings.cache_dir, task)
        x_all, _ = cache.load(rt.store, [CachedImage(s, k) for s, k in images])
    rng = np.random.default_rng(0)
    targets = torch.from_numpy(rng.integers(0, 2, len(x_all)).astype(np.float32))
    train = (x_all[:n_train], targets[:n_train])
    val = (x_all[n_train:], targets[n_train:])
    plain_ips = _plain_loop(task, train, val, device, threads, args.epochs)
    print(f"plain MONAI/PyTorch loop: {plain_ips:.1f} img/s", flush=True)

    # Scoring: every imported study, first without Grad-CAM, then (after a promotion, so every
    # study is pending again) with it.
    os.environ["RADFLOW_GRADCAM"] = "false"
    started = time.perf_counter()
    plain_scored = process_flow(name)
    score_seconds = time.perf_counter() - started
    with Runtime.open(settings) as rt, unit_of_work(rt.session_factory) as session:
        current = require_champion(session, name)
        other = session.scalars(
            select(ModelVersion).where(ModelVersion.task == name, ModelVersion.id != current.id)
        ).first()
        assert other is not None
        promote(session, other, actor="benchmark", reason="benchmark: score again")
    os.environ["RADFLOW_GRADCAM"] = "true"
    started = time.perf_counter()
    cam_scored = process_flow(name)
    cam_seconds = time.perf_counter() - started
    started = time.perf_counter()
    assert process_flow(name)["scored"] == 0
    run_overhead = time.perf_counter() - started

    # Cold: the champion's weights as a new version (every study pending again), no cache.
    os.environ["RADFLOW_GRADCAM"] = "false"
    with Runtime.open(settings) as rt, unit_of_work(rt.session_factory) as session:
        current = require_champion(session, name)
        again = register(
            session,
            rt.store,
            task,
            load_network(rt.store, current, device),
            metrics={},
            threshold=current.threshold,
            training_run=None,
        )
        promote(session, again, actor="benchmark", reason="benchmark: score with no cache")
    shutil.rmtree(settings.cache_dir)
    started = time.perf_counter()
    cold_scored = process_flow(name)
    cold_seconds = time.perf_counter() - started

    n_scored = int(plain_scored["scored"])
    score_ips, cam_ips = n_scored / score_seconds, int(cam_scored["scored"]) / cam_seconds
    cold_ips = int(cold_scored["scored"]) / cold_seconds

    with Runtime.open(settings) as rt, rt.session_factory() as session:
        network = load_network(rt.store, require_champion(session, name), device)
    started = time.perf_counter()
    with cpu_threads(threads):
        predict(network, x_all, device, settings.batch_size)
    bare_ips = len(x_all) / (time.perf_counter() - started)
    print(
        f"scoring: process flow {score_ips:.1f} studies/s, with Grad-CAM {cam_ips:.1f}, "
        f"no cache {cold_ips:.1f}; bare forward {bare_ips:.1f} img/s; "
        f"{run_overhead:.2f} s per flow run"
    )
    result = {
        "train_flow_images_per_s": round(flow_ips, 1),
        "train_plain_images_per_s": round(plain_ips, 1),
        "train_ratio": round(flow_ips / plain_ips, 3),
        "score_flow_per_s": round(score_ips, 1),
        "score_flow_gradcam_per_s": round(cam_ips, 1),
        "score_bare_per_s": round(bare_ips, 1),
        "score_ratio": round(score_ips / bare_ips, 3),
        "score_ratio_gradcam": round(cam_ips / bare_ips, 3),
        "score_flow_seconds": round(score_seconds, 2),
        "score_flow_task_s": round(float(plain_scored["seconds"]), 2),
        "score_flow_network_s": round(float(plain_scored["network_seconds"]), 2),
        "score_bare_seconds": round(len(x_all) / bare_ips, 2),
        "score_flow_cold_per_s": round(cold_ips, 1),
        "score_ratio_cold": round(cold_ips / bare_ips, 3),
        "score_flow_run_overhead_s": round(run_overhead, 2),
        "data_seconds_first": round(data_first, 2),
        "data_seconds_second": round(data_second, 2),
        "data_ratio": round(data_second / data_first, 3),
        "n_train": n_train,
        "n_scored": n_scored,
        "epochs": args.epochs,
    }
    print(json.dumps(result))
    return 0


def _plain_loop(task, train, val, device, threads, epochs):  # type: ignore[no-untyped-def]
    """A plain MONAI/PyTorch loop: same network, optimiser, batch size, transforms, validation."""
    import torch
    from sklearn.metrics import roc_auc_score

    from radflow.device import cpu_threads

    torch.manual_seed(0)
    network = task.build_network().to(device)
    optimiser = torch.optim.AdamW(
        network.parameters(), lr=task.plan.learning_rate, weight_decay=task.plan.weight_decay
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    augment = task.augmentation()
    x, y = train
    started = time.perf_counter()
    with cpu_threads(threads):
        for _ in range(epochs):
            network.train()
            for idx in torch.split(torch.randperm(len(x)), task.plan.batch_size):
                batch = torch.stack([torch.as_tensor(augment(img)) for img in x[idx]]).to(device)
                optimiser.zero_grad()
                loss = loss_fn(network(batch).squeeze(1), y[idx].to(device))
                loss.backward()
                optimiser.step()
            network.eval()
            with torch.no_grad():
                scores = torch.cat(
                    [torch.sigmoid(network(b.to(device))) for b in torch.split(val[0], 256)]
                )
            roc_auc_score(val[1].numpy(), scores.squeeze(1).cpu().numpy())
    return len(x) * epochs / (time.perf_counter() - started)


if __name__ == "__main__":
    raise SystemExit(main())
