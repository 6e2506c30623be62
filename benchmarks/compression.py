"""Runtime variants (ONNX fp32, int8) against fp32 eager PyTorch, and scoring at network speed.

    python benchmarks/compression.py [--npz ../shared/data/pneumoniamnist_trainval.npz]
                                     [--carve 0.1] [--rounds 3] [--limit N] [--explore]

In a fresh data directory, everything in one run:

1. the npz's train and val splits, less ``--carve`` of train held out as the test set (never
   trained on, never the official test split), imported with labels through the front door;
   the held-out images imported unlabeled; one training through the train flow (it fills the
   preprocessing cache); the champion compressed as ``radflow model compress`` does it
   (torch-fp32, onnx-fp32, onnx-int8, each judged on the evaluation set);
2. per variant: its size, and its AUC on the held-out test set with the delta to fp32 (the same
   test tensors through each runner);
3. throughput, in ``--rounds`` interleaved rounds (this machine's speed drifts within minutes;
   each round measures every variant side by side; figures are medians, every round's ratio is
   in the JSON):
   - bare: ``Runner.predict`` on every study's cached tensor, in memory (the same batches,
     batch size and threads for every variant: ``RADFLOW_BATCH_SIZE``, ``RADFLOW_TORCH_THREADS``),
     once right before and once right after the variant's flow run, the two taken together;
   - flow: a new champion with the same weights and the same variant files, that variant
     served, every study scored by the process flow (a Prefect run: pending studies, routing,
     cached tensors, the network, predictions and triage written), timed end to end;
4. cold: the served variant through the process flow with the preprocessing cache emptied;
5. with ``--explore``: int8 and ONNX fp32 against eager PyTorch at other batch sizes, thread
   counts, graph optimisation levels and quantisation formats (bare, 2 rounds).

Every task kind present is benchmarked; today that is binary classification on 2D images only
(pneumonia-cxr). The last line is one JSON object: int8_speedup (int8 / fp32 eager images/s,
bare), int8_auc_drop, int8_size_ratio (int8 file / fp32 weights), flow_vs_bare (process flow /
bare for the served variant, warm cache), and the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

TASK = "pneumonia-cxr"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--npz",
        type=Path,
        default=Path(__file__).parents[2] / "shared/data/pneumoniamnist_trainval.npz",
    )
    parser.add_argument("--carve", type=float, default=0.1, help="train fraction held out")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--explore", action="store_true", help="also batch/threads/format sweep")
    parser.add_argument("--limit", type=int, default=None, help="only the first N train images")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="radflow-compression-"))
    for name in ("RADFLOW_DATABASE_URL", "RADFLOW_STORE_URL", "RADFLOW_INBOX_DIR"):
        os.environ.pop(name, None)
    os.environ["RADFLOW_DATA_DIR"] = str(work / "data")
    os.environ["RADFLOW_GRADCAM"] = "false"
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from flows.embedded import run_settings

    try:
        with run_settings():  # flow runs as the CLI and the receiver start them
            return _measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(args: argparse.Namespace, work: Path) -> int:
    from accuracy import carve
    from sqlalchemy import select

    from flows.process import process_flow
    from flows.train import train_flow
    from radflow.db import Instance, VariantRuntime
    from radflow.ingest.importers import import_npz, read_npz
    from radflow.learning.cache import CachedImage, PreprocessCache
    from radflow.learning.compression import compress
    from radflow.learning.device import cpu_threads, select_device
    from radflow.learning.evaluation import binary_metrics
    from radflow.learning.inference import load_runner
    from radflow.learning.registry import require_champion
    from radflow.learning.tasks import get_task
    from radflow.runtime import Runtime
    from radflow.settings import Settings

    settings = Settings()
    task = get_task(TASK)
    device = select_device()
    threads = settings.torch_threads or None
    source = _limited(args.npz, args.limit, work) if args.limit else args.npz
    train_npz, test_npz = carve(source, args.carve, args.seed, work)
    with Runtime.open(settings) as rt:
        imported = import_npz(
            settings, rt.session_factory, rt.store, train_npz, TASK, splits=["train", "val"]
        )
        test = import_npz(
            settings, rt.session_factory, rt.store, test_npz, TASK, splits=["test"], unlabeled=True
        )
    print(f"imported {imported.summary()}; test {test.summary()}", flush=True)
    started = time.perf_counter()
    trained = train_flow(TASK, progress=False, score_waiting=False)
    print(f"trained {trained['model']} in {time.perf_counter() - started:.0f} s", flush=True)

    with Runtime.open(settings) as rt:
        with rt.session_factory() as session:
            champion = require_champion(session, TASK)
        variants = compress(
            settings, rt.session_factory, rt.store, TASK, champion.version, actor="benchmark"
        )
        judged = {v.runtime: v for v in variants}
        runners = {
            runtime: load_runner(rt.store, champion, variant, device, threads)
            for runtime, variant in judged.items()
        }
        cache = PreprocessCache(settings.cache_dir, task)
        with rt.session_factory() as session:
            rows = session.execute(select(Instance.sha256, Instance.object_key)).all()
        every, _ = cache.load(rt.store, [CachedImage(s, k) for s, k in rows])
        by_uid = _test_images(rt.session_factory, test.study_uids)
        test_x, _ = cache.load(rt.store, [CachedImage(s, k) for s, k in by_uid])
    _, parts = read_npz(test_npz, ["test"])
    assert parts[0].labels is not None
    test_y = parts[0].labels.astype(float).ravel()

    # Accuracy on the held-out test set: the same tensors through each runner.
    test_auc = {}
    with cpu_threads(threads):
        for runtime, runner in runners.items():
            scores = runner.predict(test_x, settings.batch_size)
            test_auc[runtime] = binary_metrics(test_y, scores, champion.threshold)["auc"]

    # Throughput, interleaved: each round, every variant bare and through the process flow.
    served = served_runtime(judged)
    bare: dict[Any, list[float]] = {r: [] for r in runners}
    flow: dict[Any, list[float]] = {r: [] for r in runners}
    reports: dict[Any, list[dict[str, Any]]] = {r: [] for r in runners}
    for r in range(args.rounds):
        for runtime, runner in runners.items():
            # The bare pass right before and right after the flow run, as one figure: the
            # machine's speed drifts within seconds, and bracketing halves what drift does.
            with cpu_threads(threads):
                before = _timed(runner.predict, every, settings.batch_size)[1]
            new_champion(settings, runtime)
            started = time.perf_counter()
            result = process_flow(TASK)
            seconds = time.perf_counter() - started
            with cpu_threads(threads):
                after = _timed(runner.predict, every, settings.batch_size)[1]
            bare[runtime].append(2 * len(every) / (before + after))
            flow[runtime].append(int(result["scored"]) / seconds)
            reports[runtime].append({**result["tasks"][TASK], "run_seconds": seconds})
        print(
            f"round {r + 1}: "
            + "; ".join(
                f"{rt.value} bare {bare[rt][-1]:,.0f}/s, flow {flow[rt][-1]:,.0f}/s"
                for rt in runners
            ),
            flush=True,
        )
    _, run_overhead = _timed(process_flow, TASK)  # nothing left to score

    # Cold: the served variant through the flow with the preprocessing cache emptied.
    new_champion(settings, served)
    shutil.rmtree(settings.cache_dir)
    cold, cold_seconds = _timed(process_flow, TASK)
    cold_per_s = int(cold["scored"]) / cold_seconds

    median = statistics.median
    fp32 = VariantRuntime.TORCH_FP32
    rows_out = []
    for runtime in runners:
        variant = judged[runtime]
        rows_out.append(
            {
                "runtime": runtime.value,
                "size_mb": variant.size_bytes / 1e6,
                "bare_per_s": median(bare[runtime]),
                "flow_per_s": median(flow[runtime]),
                "flow_vs_bare": median(_ratios(flow[runtime], bare[runtime])),
                "speedup": median(_ratios(bare[runtime], bare[fp32])),
                "test_auc": test_auc[runtime],
                "test_auc_delta": test_auc[runtime] - test_auc[fp32],
                "eval_auc_delta": variant.metrics["auc_delta"],
                "passed": variant.passed,
            }
        )
    _table(rows_out, served.value)
    mid = reports[served][len(reports[served]) // 2]
    int8 = VariantRuntime.ONNX_INT8
    result = {
        "int8_speedup": round(median(_ratios(bare[int8], bare[fp32])), 3),
        "int8_speedup_rounds": [round(x, 3) for x in _ratios(bare[int8], bare[fp32])],
        "int8_auc_drop": round(test_auc[fp32] - test_auc[int8], 4),
        "int8_eval_auc_drop": round(
            judged[int8].metrics["reference_auc"] - judged[int8].metrics["auc"], 4
        ),
        "int8_size_ratio": round(judged[int8].size_bytes / judged[fp32].size_bytes, 3),
        "int8_passed": judged[int8].passed,
        "served": served.value,
        "flow_vs_bare": round(median(_ratios(flow[served], bare[served])), 3),
        "flow_vs_bare_rounds": [round(x, 3) for x in _ratios(flow[served], bare[served])],
        "flow_per_s": round(median(flow[served]), 1),
        "bare_per_s": round(median(bare[served]), 1),
        "flow_cold_per_s": round(cold_per_s, 1),
        "flow_cold_vs_bare": round(cold_per_s / median(bare[served]), 3),
        # Of the median round's process flow run: its seconds end to end, those inside the
        # scoring task, and of those, in the network; and a run with nothing to score.
        "flow_run_s": round(float(mid["run_seconds"]), 2),
        "flow_task_s": round(float(mid["seconds"]), 2),
        "flow_task_network_s": round(float(mid["network_seconds"]), 2),
        "flow_task_vs_bare": round(int(mid["scored"]) / mid["seconds"] / median(bare[served]), 3),
        "flow_run_overhead_s": round(run_overhead, 2),
        "projected_100k_s": round(100_000 / median(flow[served]), 1),
        "fp32_eager_per_s": round(median(bare[fp32]), 1),
        "fp32_flow_vs_bare": round(median(_ratios(flow[fp32], bare[fp32])), 3),
        "test_auc_fp32": round(test_auc[fp32], 4),
        "n_scored": int(mid["scored"]),
        "n_test": len(test_y),
        "batch_size": settings.batch_size,
        "threads": settings.torch_threads,
        "rounds": args.rounds,
        "task_kinds": [task.kind],
    }
    _verdict(result)
    if args.explore:
        with Runtime.open(settings) as rt:
            _explore(rt.store, champion, every, settings)
    print(json.dumps(result))
    return 0


def _limited(npz: Path, n: int, work: Path) -> Path:
    """n train images and n/5 val images, drawn at random (the file is sorted by class)."""
    rng = np.random.default_rng(0)
    with np.load(npz) as data:
        train = np.sort(rng.permutation(len(data["train_images"]))[:n])
        val = np.sort(rng.permutation(len(data["val_images"]))[: n // 5])
        arrays = {
            "train_images": data["train_images"][train],
            "train_labels": data["train_labels"][train],
            "val_images": data["val_images"][val],
            "val_labels": data["val_labels"][val],
        }
    np.savez(work / "limited.npz", **arrays)
    return work / "limited.npz"


def _test_images(session_factory: Any, uids: list[str]) -> list[tuple[str, str]]:
    """(sha256, object key) of each test study's image, in the order of ``uids``."""
    from sqlalchemy import select

    from radflow.db import Instance, Series, Study

    with session_factory() as session:
        found = {
            uid: (sha, key)
            for uid, sha, key in session.execute(
                select(Study.study_uid, Instance.sha256, Instance.object_key)
                .join(Series, Series.study_id == Study.id)
                .join(Instance, Instance.series_id == Series.id)
                .where(Study.study_uid.in_(uids))
            )
        }
    return [found[uid] for uid in uids]


def served_runtime(judged: dict[Any, Any]) -> Any:
    """The variant a site would serve: int8 if it passed, else ONNX fp32 if it did, else fp32."""
    from radflow.db import VariantRuntime

    for runtime in (VariantRuntime.ONNX_INT8, VariantRuntime.ONNX_FP32):
        if judged[runtime].passed:
            return runtime
    return VariantRuntime.TORCH_FP32


def new_champion(settings: Any, runtime: Any) -> None:
    """The champion's weights again as a new champion, with its variants' files, serving
    ``runtime``: every study is pending again, to be scored in that runtime."""
    import torch
    from sqlalchemy import select

    from radflow.db import ModelVariant, unit_of_work
    from radflow.learning.inference import load_network
    from radflow.learning.registry import promote, register, require_champion
    from radflow.learning.tasks import get_task
    from radflow.learning.variants import serve
    from radflow.runtime import Runtime

    with Runtime.open(settings) as rt, unit_of_work(rt.session_factory) as session:
        current = require_champion(session, TASK)
        again = register(
            session,
            rt.store,
            get_task(TASK),
            load_network(rt.store, current, torch.device("cpu")),
            metrics={},
            threshold=current.threshold,
            training_run=None,
            actor="benchmark",
        )
        promote(session, again, actor="benchmark", reason="benchmark: score again")
        for variant in session.scalars(
            select(ModelVariant).where(ModelVariant.model_version_id == current.id)
        ):
            session.add(
                ModelVariant(
                    model_version_id=again.id,
                    runtime=variant.runtime,
                    object_key=variant.object_key,
                    size_bytes=variant.size_bytes,
                    metrics=variant.metrics,
                    passed=variant.passed,
                    reason=variant.reason,
                )
            )
        session.flush()
        serve(session, again, runtime, actor="benchmark")


def _timed(fn: Any, *fn_args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn(*fn_args)
    return result, time.perf_counter() - started


def _ratios(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b, strict=True)]


def _table(rows: list[dict[str, Any]], served: str) -> None:
    print()
    print(
        f"{'runtime':<11} {'size MB':>8} {'bare img/s':>11} {'speed-up':>9} "
        f"{'flow st/s':>10} {'flow/bare':>9} {'test AUC':>9} {'delta':>8} {'eval delta':>10}  check"
    )
    for row in rows:
        mark = " (served)" if row["runtime"] == served else ""
        print(
            f"{row['runtime']:<11} {row['size_mb']:>8.3f} {row['bare_per_s']:>11,.0f} "
            f"{row['speedup']:>8.2f}x {row['flow_per_s']:>10,.0f} {row['flow_vs_bare']:>9.3f} "
            f"{row['test_auc']:>9.4f} {row['test_auc_delta']:>+8.4f} "
            f"{row['eval_auc_delta']:>+10.4f}  {'passed' if row['passed'] else 'refused'}{mark}"
        )
    print()


FLOOR = {"int8_speedup": 2.0, "int8_auc_drop": 0.005, "int8_size_ratio": 0.3, "flow_vs_bare": 0.9}
GOAL = {"int8_speedup": 3.0, "flow_vs_bare": 0.95, "projected_100k_s": 120.0}
LOWER_IS_BETTER = {"int8_auc_drop", "int8_size_ratio", "projected_100k_s"}


def _verdict(result: dict[str, Any]) -> None:
    """Each figure against issue 14's floor and goal."""
    for name, targets in (("floor", FLOOR), ("goal", GOAL)):
        marks = []
        for key, target in targets.items():
            value = result[key]
            met = value <= target if key in LOWER_IS_BETTER else value >= target
            sign = "<=" if key in LOWER_IS_BETTER else ">="
            marks.append(f"{key} {value} ({sign} {target}: {'met' if met else 'MISSED'})")
        print(f"{name}: " + "; ".join(marks))


def _explore(store: Any, champion: Any, images: Any, settings: Any) -> None:
    """Bare throughput of int8 and ONNX fp32 against eager PyTorch, at other batch sizes,
    threads, graph optimisation levels and quantisation formats (2 interleaved rounds)."""
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantFormat, QuantType

    from radflow.db import VariantRuntime
    from radflow.learning import compression
    from radflow.learning.device import cpu_threads
    from radflow.learning.inference import OnnxRunner, TorchRunner, input_shape, load_network

    cpu = torch.device("cpu")
    network = load_network(store, champion, cpu)
    fp32 = compression.export_onnx(network, input_shape(champion))
    calibration = images[:: max(1, len(images) // compression.CALIBRATION_IMAGES)].numpy()
    int8 = compression.quantize_int8(fp32, calibration, settings.batch_size)

    def quantized(**changes: Any) -> bytes:
        # The platform's quantisation with one choice changed.
        import tempfile as tf

        from onnxruntime.quantization import quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        with tf.TemporaryDirectory() as tmp:
            src, pre, out = (Path(tmp) / n for n in ("a.onnx", "b.onnx", "c.onnx"))
            src.write_bytes(fp32)
            quant_pre_process(str(src), str(pre))
            options = {
                "quant_format": QuantFormat.QDQ,
                "activation_type": QuantType.QUInt8,
                "weight_type": QuantType.QInt8,
                "per_channel": True,
                "op_types_to_quantize": list(compression.INT8_OPS),
            } | changes
            quantize_static(
                str(pre),
                str(out),
                compression._Batches(calibration, settings.batch_size),
                **options,
            )
            return out.read_bytes()

    candidates: dict[str, Any] = {
        "int8 QOperator": quantized(quant_format=QuantFormat.QOperator),
        "int8 per-tensor": quantized(per_channel=False),
        "int8 S8S8": quantized(activation_type=QuantType.QInt8),
    }

    def runner(model: bytes, threads: int, level: Any = None) -> OnnxRunner:
        made = OnnxRunner(model, VariantRuntime.ONNX_INT8, cpu, threads)
        if level is not None:
            options = ort.SessionOptions()
            options.graph_optimization_level = level
            options.intra_op_num_threads = threads
            made.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        return made

    print("explore (bare images/s; speed-up over fp32 eager on the same batches and threads)")
    for threads in (1, 2):
        for batch in (32, 128, 512):
            measured: dict[str, list[float]] = {}
            for _ in range(2):
                contenders: dict[str, Any] = {
                    "fp32 eager": TorchRunner(network, cpu),
                    "onnx fp32": runner(fp32, threads),
                    "int8 (platform)": runner(int8, threads),
                    "int8 basic opt": runner(
                        int8, threads, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
                    ),
                    **{name: runner(model, threads) for name, model in candidates.items()},
                }
                for name, contender in contenders.items():
                    contender.predict(images[:batch], batch)  # warm-up
                    with cpu_threads(threads):
                        started = time.perf_counter()
                        contender.predict(images, batch)
                    measured.setdefault(name, []).append(
                        len(images) / (time.perf_counter() - started)
                    )
            base = statistics.median(measured["fp32 eager"])
            print(
                f"  threads {threads} batch {batch:>3}: "
                + ", ".join(
                    f"{name} {statistics.median(v):,.0f} ({statistics.median(v) / base:.2f}x)"
                    for name, v in measured.items()
                ),
                flush=True,
            )


if __name__ == "__main__":
    raise SystemExit(main())
