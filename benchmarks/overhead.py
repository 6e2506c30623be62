"""What the platform costs on top of the compute: training, scoring and the preprocessing cache.

    python benchmarks/overhead.py [--npz ../shared/data/pneumoniamnist_trainval.npz] [--n 1500]

In a fresh data directory, side by side in one run, in ``--rounds`` interleaved rounds (this
machine's speed drifts by up to 2x within minutes, so each round compares neighbours in time;
the figures are medians, and every round's ratio is in the JSON):

1. training throughput (images/s) of a retrain through the train flow (warm cache), timed end
   to end (data, fit, evaluation, registration, the promotion test), vs a plain MONAI/PyTorch
   loop with the same network, batch size, transforms and per-epoch validation;
2. batch scoring through the process flow, timed end to end (a Prefect flow run: pending
   studies from the database, routing, preprocessed tensors, the network, predictions and
   triage written) vs the bare model forward (``Runner.predict``, same threads and batch size)
   on the same preprocessed tensors, in studies (images) per second, both in the runtime the
   champion serves: after the training rounds the champion is compressed (as ``radflow model
   compress``) and its int8 variant served if it passed its check (else ONNX fp32, else the
   PyTorch weights; ``score_runtime`` in the JSON). Each round first registers the champion's
   weights again as a new champion with the same variants, serving the same runtime, so every
   study is pending:
   - ``score_flow_per_s``: the goal's figure. The studies were trained on, so their tensors are
     in the preprocessing cache, as they are in use the other way round (scoring fills the
     cache; the labelled studies a retrain reads were scored first);
   - ``score_flow_gradcam_per_s``: the same with a Grad-CAM map per study (one run);
   - ``score_flow_cold_per_s``: the same with an empty cache (every DICOM decoded; one run);
   - ``score_flow_task_s`` / ``score_flow_network_s``: of the median round's run, the seconds
     inside the scoring task, and of those, in the network (``predict``) alone;
   - ``score_flow_run_overhead_s``: a process flow run with nothing to score: what a run
     costs whatever its size, mostly Prefect's API calls (flows/embedded.py: no heartbeat
     thread on the embedded default, as the CLI and the receiver run flows). Not subtracted
     from anything;
3. data-loading time of a retrain vs the first training (the preprocessing cache).

The last line is one JSON object with the ratios.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
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
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds of each comparison (medians)"
    )
    parser.add_argument(
        "--runtime",
        choices=["torch-fp32", "onnx-fp32", "onnx-int8"],
        default=None,
        help="score in this runtime (it must pass its check); default: the best that passes, "
        "as a site serves it. torch-fp32 compares with figures from before compressed runtimes",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="radflow-overhead-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # gigabytes of images
    for name in ("RADFLOW_DATABASE_URL", "RADFLOW_STORE_URL", "RADFLOW_INBOX_DIR"):
        os.environ.pop(name, None)
    os.environ["RADFLOW_DATA_DIR"] = str(work / "data")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from flows.embedded import run_settings

    with run_settings():  # flow runs as the CLI and the receiver start them
        return _measure(args, work)


def _measure(args: argparse.Namespace, work: Path) -> int:
    import dataclasses
    import statistics

    import torch
    from compression import new_champion as new_serving_champion
    from compression import served_runtime
    from sqlalchemy import select

    from flows.process import process_flow
    from flows.train import train_flow
    from radflow.db import Instance, ModelVersion, TrainingRun, VariantRuntime
    from radflow.ingest.importers import import_npz
    from radflow.learning import tasks
    from radflow.learning.cache import CachedImage, PreprocessCache
    from radflow.learning.compression import compress
    from radflow.learning.device import cpu_threads, select_device
    from radflow.learning.inference import load_runner
    from radflow.learning.registry import require_champion
    from radflow.learning.variants import serving_variant
    from radflow.runtime import Runtime
    from radflow.settings import Settings

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

    def timed(fn, *fn_args):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        result = fn(*fn_args)
        return result, time.perf_counter() - started

    first = train_flow(name, progress=False, score_waiting=False)  # fills the preprocessing cache
    data_first, n_train = run_stats(first["model"])
    # The plain loop's data: the same tensors, in memory.
    with Runtime.open(settings) as rt, rt.session_factory() as session:
        images = session.execute(select(Instance.sha256, Instance.object_key)).all()
        cache = PreprocessCache(settings.cache_dir, task)
        x_all, _ = cache.load(rt.store, [CachedImage(s, k) for s, k in images])
    rng = np.random.default_rng(0)
    targets = torch.from_numpy(rng.integers(0, 2, len(x_all)).astype(np.float32))
    train = (x_all[:n_train], targets[:n_train])
    val = (x_all[n_train:], targets[n_train:])

    # Training, interleaved (this machine's speed drifts by up to 2x within minutes): each round
    # runs the plain loop, then a retrain through the flow (warm cache), timed end to end.
    flow_ips, plain_ips, data_seconds = [], [], []
    for r in range(args.rounds):
        plain_ips.append(_plain_loop(task, train, val, device, threads, args.epochs))
        retrained, seconds = timed(lambda: train_flow(name, progress=False, score_waiting=False))
        flow_ips.append(n_train * args.epochs / seconds)
        data_seconds.append(run_stats(retrained["model"])[0])
        print(
            f"training round {r + 1}: train flow {flow_ips[-1]:.1f} img/s, plain loop "
            f"{plain_ips[-1]:.1f} img/s; data loading {data_first:.1f} s -> "
            f"{data_seconds[-1]:.2f} s",
            flush=True,
        )

    # Scoring, interleaved too: the champion is compressed and its best passing variant served;
    # each round makes every study pending (a new champion with the same weights and variants
    # serving the same runtime), scores them all through the process flow, then runs the bare
    # forward.
    os.environ["RADFLOW_GRADCAM"] = "false"
    with Runtime.open(settings) as rt:
        with rt.session_factory() as session:
            number = require_champion(session, name).version
        variants = compress(settings, rt.session_factory, rt.store, name, number, actor="bench")
    judged = {v.runtime: v for v in variants}
    runtime = VariantRuntime(args.runtime) if args.runtime else served_runtime(judged)
    if runtime != VariantRuntime.TORCH_FP32 and not judged[runtime].passed:
        raise SystemExit(f"--runtime {runtime}: that variant did not pass its check")
    print(f"scoring in {runtime}", flush=True)

    def new_champion() -> None:
        """The champion's weights and variants again, as a new champion serving ``runtime``."""
        new_serving_champion(settings, runtime)

    score_ips, bare_ips, score_results = [], [], []
    for r in range(args.rounds):
        new_champion()
        scored, seconds = timed(process_flow, name)
        score_results.append(scored)
        score_ips.append(int(scored["scored"]) / seconds)
        with Runtime.open(settings) as rt, rt.session_factory() as session:
            champion = require_champion(session, name)
            runner = load_runner(
                rt.store, champion, serving_variant(session, champion), device, threads
            )
        with cpu_threads(threads):
            _, seconds = timed(runner.predict, x_all, settings.batch_size)
        bare_ips.append(len(x_all) / seconds)
        print(
            f"scoring round {r + 1}: process flow {score_ips[-1]:.1f} studies/s "
            f"({scored['scored']} scored), bare forward {bare_ips[-1]:.1f} img/s",
            flush=True,
        )
    _, run_overhead = timed(process_flow, name)  # nothing left to score

    os.environ["RADFLOW_GRADCAM"] = "true"
    new_champion()
    cam_scored, cam_seconds = timed(process_flow, name)
    os.environ["RADFLOW_GRADCAM"] = "false"
    new_champion()
    shutil.rmtree(settings.cache_dir)
    cold_scored, cold_seconds = timed(process_flow, name)

    median = statistics.median
    ratio = median(s / b for s, b in zip(score_ips, bare_ips, strict=True))
    train_ratio = median(f / p for f, p in zip(flow_ips, plain_ips, strict=True))
    cam_ips = int(cam_scored["scored"]) / cam_seconds
    cold_ips = int(cold_scored["scored"]) / cold_seconds
    mid = score_results[len(score_results) // 2]
    mid_task = mid["tasks"][name]  # the scoring task's own report (the flow's has no seconds)
    print(
        f"scoring ({runtime}): process flow {median(score_ips):.1f} studies/s, with Grad-CAM "
        f"{cam_ips:.1f}, "
        f"no cache {cold_ips:.1f}; bare forward {median(bare_ips):.1f} img/s; "
        f"{run_overhead:.2f} s per flow run"
    )
    result = {
        "train_flow_images_per_s": round(median(flow_ips), 1),
        "train_plain_images_per_s": round(median(plain_ips), 1),
        "train_ratio": round(train_ratio, 3),
        "train_ratio_rounds": [round(f / p, 3) for f, p in zip(flow_ips, plain_ips, strict=True)],
        "score_runtime": runtime.value,
        "score_flow_per_s": round(median(score_ips), 1),
        "score_flow_gradcam_per_s": round(cam_ips, 1),
        "score_bare_per_s": round(median(bare_ips), 1),
        "score_ratio": round(ratio, 3),
        "score_ratio_rounds": [round(s / b, 3) for s, b in zip(score_ips, bare_ips, strict=True)],
        "score_ratio_gradcam": round(cam_ips / median(bare_ips), 3),
        "score_flow_task_s": round(float(mid_task["seconds"]), 2),
        "score_flow_network_s": round(float(mid_task["network_seconds"]), 2),
        "score_flow_cold_per_s": round(cold_ips, 1),
        "score_ratio_cold": round(cold_ips / median(bare_ips), 3),
        "score_flow_run_overhead_s": round(run_overhead, 2),
        "data_seconds_first": round(data_first, 2),
        "data_seconds_second": round(median(data_seconds), 2),
        "data_ratio": round(median(data_seconds) / data_first, 3),
        "n_train": n_train,
        "n_scored": int(mid["scored"]),
        "epochs": args.epochs,
        "rounds": args.rounds,
    }
    print(json.dumps(result))
    return 0


def _plain_loop(task, train, val, device, threads, epochs):  # type: ignore[no-untyped-def]
    """A plain MONAI/PyTorch loop: same network, optimiser, batch size, transforms, validation."""
    import torch
    from sklearn.metrics import roc_auc_score

    from radflow.learning.device import cpu_threads

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
