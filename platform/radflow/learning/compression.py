"""Compressed runtime variants of a model version: ONNX export, int8 quantisation, judging.

``radflow model compress TASK VERSION`` makes every variant of radflow.db.VariantRuntime for
one registry version and judges each like a version:

- ``torch-fp32``: the version's own weights, the reference every other variant is compared with;
- ``onnx-fp32``: exported by ``torch.onnx.export`` (the torch.export-based exporter), with one
  graph rewrite (:func:`_leaky_relus`); its probabilities must match PyTorch's within
  ``FP32_TOLERANCE`` on every evaluation image;
- ``onnx-int8``: that graph statically quantised by ONNX Runtime's tools (QDQ format, int8
  per-channel weights, uint8 activations), calibrated on up to ``CALIBRATION_IMAGES`` of the
  task's training images, never on the evaluation set.

Each is measured on the task's fixed evaluation set (radflow.learning.training.evaluation_set):
its metrics at the version's threshold, its size, its throughput (images/s at the scoring's
batch size and threads) and a paired non-inferiority check against the reference on the same
studies (radflow.learning.evaluation.non_inferiority; for classification the AUC may drop by at
most ``settings.max_variant_auc_drop``). Only a variant that passes may serve
(radflow.learning.variants.serve).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from torch import nn

from radflow.db import EvaluationSet, ModelVariant, ModelVersion, VariantRuntime, unit_of_work
from radflow.db.audit import record
from radflow.ingest.routing import rules_for
from radflow.learning.cache import CachedImage, PreprocessCache
from radflow.learning.device import cpu_threads, select_device
from radflow.learning.evaluation import (
    PRIMARY_METRIC,
    evaluate,
    non_inferiority,
    primary_metric,
)
from radflow.learning.inference import (
    INPUT_NAME,
    OUTPUT_NAME,
    OnnxRunner,
    Runner,
    TorchRunner,
    input_shape,
    load_network,
)
from radflow.learning.registry import get_version
from radflow.learning.tasks import Task, get_task
from radflow.learning.training import Example, labelled_examples, split_for_training
from radflow.learning.variants import VariantError, serving_variant
from radflow.settings import Settings
from radflow.store import ObjectStore, keys

logger = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-4
"""Largest difference of an ONNX fp32 probability from PyTorch's on any evaluation image."""
CALIBRATION_IMAGES = 256
"""Training images the int8 activation ranges are calibrated on (ONNX Runtime suggests a few
hundred; more changes the ranges little and costs a forward pass each)."""
INT8_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "LeakyRelu", "Relu", "Concat")
"""Operators quantised: those ONNX Runtime's CPU provider has int8 kernels for (QLinearConv,
QGemm, QLinearAdd, QLinearLeakyRelu, ...). Normalisations stay fp32 without quantise/dequantise
pairs around them, which would cost time and accuracy and save nothing."""
FILES = {VariantRuntime.ONNX_FP32: "model.onnx", VariantRuntime.ONNX_INT8: "model-int8.onnx"}
"""Each ONNX variant's file name, in the object store (models/<task>/v<n>/) and in bundles."""


def export_onnx(network: nn.Module, shape: Sequence[int]) -> bytes:
    """``network`` as an ONNX model taking (batch, *shape) images, batch size free."""
    example = torch.rand(2, *shape)  # 2, not 1: torch.export would fix a batch of 1
    with warnings.catch_warnings(), _quiet("torch.onnx"):
        # The exporter warns about its own internals (deprecated private APIs it calls, and
        # torchvision operators it cannot register without torchvision): nothing to act on.
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            network.cpu().eval(),
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    assert program is not None  # dynamo=True returns the exported program
    model = program.model_proto
    _leaky_relus(model)
    _without_debug_info(model)
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Only errors from logger ``name`` while the block runs."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _without_debug_info(model: onnx.ModelProto) -> None:
    """Drop what the exporter notes on each node for debugging: the PyTorch stack trace, module
    path and FX node (2.5 kB a node, with this machine's file paths, which a bundle should not
    carry; nothing reads them to run the model)."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


def _leaky_relus(model: onnx.ModelProto) -> None:
    """Rewrite PRelu nodes whose slope is one constant as LeakyRelu with that slope.

    The same function; but ONNX Runtime's PRelu broadcasts its slope element by element (40%
    of the pneumonia network's time in ONNX Runtime), its LeakyRelu is a vectorised activation,
    and quantised it becomes QLinearLeakyRelu instead of a dequantise-PRelu-quantise detour.
    """
    constants = {init.name: init for init in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        slope = constants.get(node.input[1]) if node.op_type == "PRelu" else None
        if slope is not None and int(np.prod(slope.dims)) == 1:
            alpha = float(numpy_helper.to_array(slope).reshape(-1)[0])
            node = helper.make_node(
                "LeakyRelu", [node.input[0]], list(node.output), name=node.name, alpha=alpha
            )
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


class _Batches(CalibrationDataReader):  # type: ignore[misc]  # untyped base class
    def __init__(self, images: np.ndarray, batch_size: int) -> None:
        self._batches = iter(
            [{INPUT_NAME: images[i : i + batch_size]} for i in range(0, len(images), batch_size)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_int8(model: bytes, calibration: np.ndarray, batch_size: int = 32) -> bytes:
    """``model`` (fp32 ONNX) statically quantised to int8, calibrated on ``calibration`` images.

    QDQ format, as ONNX Runtime recommends: the graph stays a standard ONNX graph, and each
    execution provider fuses what it has kernels for (the CPU: U8S8 QLinearConv, which VNNI
    and AVX2 run fast; TensorRT reads the scales). Weights per channel: one scale per output
    channel keeps small-range filters precise. Activations uint8: the CPU provider converts
    int8 activations to uint8 only where a tensor has one consumer, and leaves the others
    (every residual branch) in slow fp32 convolutions.
    """
    if len(calibration) == 0:
        raise ValueError("int8 calibration needs at least one image")
    with tempfile.TemporaryDirectory(prefix="radflow-quantize-") as tmp:
        source, prepared, quantized = (Path(tmp) / n for n in ("in.onnx", "pre.onnx", "q.onnx"))
        source.write_bytes(model)
        quant_pre_process(str(source), str(prepared))  # shape inference and graph folding
        quantize_static(
            str(prepared),
            str(quantized),
            _Batches(np.ascontiguousarray(calibration, dtype=np.float32), batch_size),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=list(INT8_OPS),
            calibrate_method=CalibrationMethod.MinMax,
        )
        return quantized.read_bytes()


@dataclass(frozen=True)
class EvaluationData:
    """What variants are judged and calibrated on: the task's evaluation set and training images."""

    images: torch.Tensor  # the evaluation set's preprocessed images
    targets: np.ndarray
    calibration: np.ndarray  # training images, never from the evaluation set


def evaluation_data(
    settings: Settings, session: Session, store: ObjectStore, task: Task
) -> EvaluationData:
    """The task's evaluation set and calibration images, from the preprocessing cache."""
    frozen = session.scalar(select(EvaluationSet).where(EvaluationSet.task == task.name))
    if frozen is None:
        raise VariantError(
            "no-evaluation-set",
            f"{task.name} has no evaluation set yet, so no variant can be judged: train it "
            f"first (`radflow train --task {task.name}`)",
        )
    split = split_for_training(labelled_examples(session, task, rules_for(settings)), frozen)
    if not split.val or not split.train:
        raise VariantError(
            "no-evaluation-set",
            f"{task.name} has {len(split.val)} labelled evaluation studies and "
            f"{len(split.train)} training studies; variants need both (label more studies)",
        )
    rng = np.random.default_rng(settings.seed)
    picked = sorted(rng.permutation(len(split.train))[:CALIBRATION_IMAGES])
    cache = PreprocessCache(settings.cache_dir, task)
    images, _ = cache.load(store, _cached(split.val))
    calibration, _ = cache.load(store, _cached([split.train[i] for i in picked]))
    targets = np.array([e.target for e in split.val], dtype=np.float64)
    return EvaluationData(images, targets, calibration.numpy())


def _cached(examples: Sequence[Example]) -> list[CachedImage]:
    return [CachedImage(e.sha256, e.object_key) for e in examples]


def compress(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    task_name: str,
    number: int,
    *,
    actor: str,
) -> list[ModelVariant]:
    """Make, measure and judge every runtime variant of version ``number`` of ``task_name``."""
    task = get_task(task_name)
    if task.kind not in PRIMARY_METRIC:
        raise VariantError(
            "unsupported-kind",
            f"{task.name} is a {task.kind} task, and variants of {task.kind} models cannot be "
            "judged yet (no primary metric in radflow.learning.evaluation.PRIMARY_METRIC): "
            "it scores with its PyTorch weights",
        )
    with session_factory() as session:
        version = get_version(session, task.name, number)
        data = evaluation_data(settings, session, store, task)
        session.expunge(version)
    network = load_network(store, version, torch.device("cpu"))
    fp32 = export_onnx(network, input_shape(version))
    int8 = quantize_int8(fp32, data.calibration, settings.batch_size)
    models = {
        VariantRuntime.ONNX_FP32: fp32,
        VariantRuntime.ONNX_INT8: int8,
    }
    with unit_of_work(session_factory) as session:
        variants = judge_variants(
            settings,
            session,
            store,
            session.get_one(ModelVersion, version.id),
            models,
            data,
            actor=actor,
        )
    return variants


def judge_variants(
    settings: Settings,
    session: Session,
    store: ObjectStore,
    version: ModelVersion,
    models: Mapping[VariantRuntime, bytes],
    data: EvaluationData,
    *,
    actor: str,
) -> list[ModelVariant]:
    """Measure the version's weights and each ONNX model of ``models`` on ``data``, judge each
    against the weights, and store them as the version's variants (replacing earlier ones)."""
    serving = serving_variant(session, version)
    if serving is not None and serving.runtime in models:
        raise VariantError(
            "variant-serving",
            f"{version.name}'s {serving.runtime} variant is serving; serve another runtime "
            f"(`radflow model serve {version.task} {version.version} --runtime torch-fp32`) "
            "before making it again",
        )
    device = select_device()
    threads = settings.torch_threads or None
    with cpu_threads(threads):
        reference = _measure(
            TorchRunner(load_network(store, version, device), device), data, settings.batch_size
        )
        measured = {
            runtime: _measure(
                OnnxRunner(model, runtime, device, threads), data, settings.batch_size
            )
            for runtime, model in models.items()
        }
    weights = len(store.get_bytes(version.weights_key))
    out = [
        _store(
            session,
            version,
            VariantRuntime.TORCH_FP32,
            version.weights_key,
            weights,
            _metrics(version, data, reference, reference, threads, settings.batch_size),
            True,
            "the version's own weights: the reference its other variants are judged against",
        )
    ]
    metric = primary_metric(get_task(version.task).kind)
    for runtime, model in models.items():
        result = measured[runtime]
        check = non_inferiority(
            metric, data.targets, reference.scores, result.scores, settings.max_variant_auc_drop
        )
        passed, reason = check.passed, check.reason
        difference = float(np.abs(result.scores - reference.scores).max())
        if runtime == VariantRuntime.ONNX_FP32 and difference > FP32_TOLERANCE:
            passed = False
            reason = (
                f"refused: the export does not reproduce PyTorch (largest probability "
                f"difference {difference:.2g} > {FP32_TOLERANCE:g}); {check.reason}"
            )
        key = keys.model(version.task, version.version, FILES[runtime])
        store.put_bytes(key, model)
        out.append(
            _store(
                session,
                version,
                runtime,
                key,
                len(model),
                _metrics(version, data, result, reference, threads, settings.batch_size),
                passed,
                reason,
            )
        )
        logger.info("%s %s: %s", version.name, runtime, reason)
    session.add(
        record(
            actor,
            "compress",
            "model_version",
            version.name,
            task=version.task,
            variants={v.runtime.value: v.passed for v in out},
        )
    )
    session.flush()
    return out


@dataclass(frozen=True)
class _Measured:
    scores: np.ndarray
    images_per_second: float


def _measure(runner: Runner, data: EvaluationData, batch_size: int) -> _Measured:
    """The runner's scores on the evaluation images, and its throughput on a second pass (the
    first one also warms it up: allocations, lazily built kernels)."""
    scores = runner.predict(data.images, batch_size)
    started = time.perf_counter()
    runner.predict(data.images, batch_size)
    seconds = time.perf_counter() - started
    return _Measured(scores.astype(np.float64), len(data.images) / max(seconds, 1e-9))


def _metrics(
    version: ModelVersion,
    data: EvaluationData,
    result: _Measured,
    reference: _Measured,
    threads: int | None,
    batch_size: int,
) -> dict[str, Any]:
    metrics: dict[str, Any] = evaluate(data.targets, result.scores, version.threshold)
    reference_metrics = evaluate(data.targets, reference.scores, version.threshold)
    return {
        **metrics,
        "reference_auc": reference_metrics["auc"],
        "auc_delta": metrics["auc"] - reference_metrics["auc"],
        "max_abs_difference": float(np.abs(result.scores - reference.scores).max()),
        "images_per_second": result.images_per_second,
        "speedup": result.images_per_second / reference.images_per_second,
        "batch_size": batch_size,
        "threads": threads or 0,
    }


def _store(
    session: Session,
    version: ModelVersion,
    runtime: VariantRuntime,
    object_key: str,
    size_bytes: int,
    metrics: dict[str, Any],
    passed: bool,
    reason: str,
) -> ModelVariant:
    """The version's ``runtime`` variant row, made or replaced."""
    row = session.scalar(
        select(ModelVariant).where(
            ModelVariant.model_version_id == version.id, ModelVariant.runtime == runtime
        )
    )
    if row is None:
        row = ModelVariant(model_version_id=version.id, runtime=runtime, serving=False)
        session.add(row)
    row.object_key, row.size_bytes, row.metrics = object_key, size_bytes, metrics
    row.passed, row.reason = passed, reason[:512]
    session.flush()
    return row
