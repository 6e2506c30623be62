"""Runtime variants: ONNX export and parity, int8 quantisation, the non-inferiority gate, serving
(scoring in the served runtime, Grad-CAM still from PyTorch), rollback, ONNX providers.

A tiny network (the task's MONAI Classifier, two small blocks) trained on clearly separable
images keeps each test to seconds while going through the real paths: the task's evaluation set,
calibration on its training images, the registry, the scoring and the audit trail.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from factories import make_study
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import (
    AuditEvent,
    ModelVariant,
    ModelVersion,
    Prediction,
    Study,
    StudyStatus,
    VariantRuntime,
    unit_of_work,
)
from radflow.learning import scoring, tasks
from radflow.learning.compression import (
    FP32_TOLERANCE,
    compress,
    evaluation_data,
    export_onnx,
    judge_variants,
    quantize_int8,
)
from radflow.learning.device import onnx_providers
from radflow.learning.inference import OnnxRunner, TorchRunner, input_shape, load_network
from radflow.learning.labels import add_label
from radflow.learning.registry import get_version
from radflow.learning.tasks import NetworkSpec, TrainingPlan
from radflow.learning.training import train_task
from radflow.learning.variants import VariantError, rollback_serving, serve, serving_runtime
from radflow.settings import Settings
from radflow.store import ObjectStore

CPU = torch.device("cpu")
TINY = NetworkSpec(
    target="monai.networks.nets.Classifier",
    args={
        "in_shape": (1, 32, 32),
        "classes": 1,
        "channels": (4, 8),
        "strides": (2, 2),
        "num_res_units": 1,
    },
    cam_layer="net.layer_1",
)


@pytest.fixture
def tiny_task(monkeypatch: pytest.MonkeyPatch) -> str:
    """pneumonia-cxr with the tiny network and a short plan."""
    task = tasks.get_task("pneumonia-cxr")
    plan = TrainingPlan(epochs=6, batch_size=8, learning_rate=1e-2, min_labels=8)
    monkeypatch.setitem(tasks.TASKS, task.name, dataclasses.replace(task, network=TINY, plan=plan))
    return task.name


def _image(rng: np.random.Generator, positive: bool) -> np.ndarray:
    """Noise, and for a positive a bright square somewhere in the middle."""
    pixels = rng.integers(800, 1200, (40, 40))
    if positive:
        row, column = rng.integers(8, 20, 2)
        pixels[row : row + 12, column : column + 12] += 2500
    return pixels


@pytest.fixture
def trained(
    tiny_task: str, settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore
) -> ModelVersion:
    """Version 1 of the tiny task, trained on 32 studies; 24 more form the evaluation set."""
    rng = np.random.default_rng(0)
    with unit_of_work(session_factory) as session:
        for i in range(56):
            positive = i % 2 == 1
            study = make_study(session, store, pixels=_image(rng, positive))
            value = "pneumonia" if positive else "normal"
            split = "val" if i >= 32 else "train"
            add_label(
                session, study.study_uid, tiny_task, value, source="t", author="t", split=split
            )
    return train_task(settings, session_factory, store, tiny_task, progress=False)


def test_export_keeps_the_network_and_int8_quantises_it() -> None:
    torch.manual_seed(0)
    network = TINY.build().eval()
    images = torch.rand(20, 1, 32, 32)

    fp32 = export_onnx(network, (1, 32, 32))
    int8 = quantize_int8(fp32, images.numpy()[:12], batch_size=4)

    ops = {node.op_type for node in onnx.load_from_string(fp32).graph.node}
    assert "PRelu" not in ops and "LeakyRelu" in ops  # the same function, a faster kernel
    reference = TorchRunner(network, CPU).predict(images, 8)
    exported = OnnxRunner(fp32, VariantRuntime.ONNX_FP32, CPU, 1).predict(images, 8)
    assert np.abs(exported - reference).max() <= FP32_TOLERANCE
    quantized = onnx.load_from_string(int8).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in quantized.node}
    weights = [i for i in quantized.initializer if i.name.endswith("weight_quantized")]
    assert weights and all(w.data_type == onnx.TensorProto.INT8 for w in weights)
    # Any batch size runs (the batch dimension is free), to the same probabilities.
    single = OnnxRunner(int8, VariantRuntime.ONNX_INT8, CPU, 1)
    np.testing.assert_allclose(single.predict(images, 1), single.predict(images, 20), atol=1e-6)
    with pytest.raises(ValueError, match="at least one image"):
        quantize_int8(fp32, images.numpy()[:0])


def test_variants_are_judged_on_the_evaluation_set_and_the_served_one_scores(
    trained: ModelVersion,
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
) -> None:
    variants = compress(settings, session_factory, store, trained.task, 1, actor="max")

    by_runtime = {v.runtime: v for v in variants}
    assert list(by_runtime) == list(VariantRuntime)
    reference = by_runtime[VariantRuntime.TORCH_FP32]
    assert reference.passed and reference.metrics["auc"] > 0.9 and reference.metrics["n"] == 24
    fp32, int8 = by_runtime[VariantRuntime.ONNX_FP32], by_runtime[VariantRuntime.ONNX_INT8]
    assert fp32.passed and fp32.metrics["max_abs_difference"] <= FP32_TOLERANCE
    assert int8.passed, int8.reason
    assert abs(int8.metrics["auc_delta"]) <= settings.max_variant_auc_drop
    assert int8.metrics["images_per_second"] > 0 and int8.size_bytes > 0

    # int8 is served: the process flow's scoring (here, of every labelled study) uses it.
    with unit_of_work(session_factory) as session:
        serve(session, get_version(session, trained.task, 1), "onnx-int8", actor="max")
    report = scoring.score_stable(
        session_factory, store, trained.task, 4, explain=True, cache_dir=settings.cache_dir
    )
    assert (report.runtime, report.scored) == ("onnx-int8", 56)
    with session_factory() as session:
        data = evaluation_data(settings, session, store, tasks.get_task(trained.task))
        held_out = session.scalars(
            select(Prediction)
            .join(Study, Study.id == Prediction.study_id)
            .order_by(Prediction.study_id)
            .offset(32)
        ).all()
        version = get_version(session, trained.task, 1)
        assert serving_runtime(session, version) == VariantRuntime.ONNX_INT8
        served = [
            (e.actor, e.details["runtime"], e.details["previous"])
            for e in session.scalars(select(AuditEvent).where(AuditEvent.action == "serve"))
        ]
    assert served == [("max", "onnx-int8", "torch-fp32")]
    assert {p.runtime for p in held_out} == {VariantRuntime.ONNX_INT8}
    assert all("gradcam" in p.derived_keys for p in held_out)  # maps from the PyTorch weights
    # The stored scores are the int8 model's (not the PyTorch scores Grad-CAM computed).
    int8_scores = OnnxRunner(store.get_bytes(int8.object_key), int8.runtime, CPU).predict(
        data.images, 8
    )
    torch_scores = TorchRunner(load_network(store, version, CPU), CPU).predict(data.images, 8)
    stored = np.array([p.score for p in held_out])
    np.testing.assert_allclose(stored, int8_scores, atol=1e-6)
    assert np.abs(stored - torch_scores).max() > 1e-6

    # Rolled back like a promotion: PyTorch serves again, audited; nothing further to undo.
    with unit_of_work(session_factory) as session:
        assert rollback_serving(session, trained.task, actor="ada") == VariantRuntime.TORCH_FP32
    with unit_of_work(session_factory) as session, pytest.raises(VariantError) as undone:
        rollback_serving(session, trained.task, actor="ada")
    assert undone.value.reason == "nothing-to-roll-back"
    with session_factory() as session:
        version = get_version(session, trained.task, 1)
        assert serving_runtime(session, version) == VariantRuntime.TORCH_FP32
        back = session.scalars(select(AuditEvent).where(AuditEvent.action == "serve-rollback"))
        assert [(e.actor, e.details["runtime"]) for e in back] == [("ada", "torch-fp32")]


def test_the_gate_refuses_a_variant_from_a_broken_calibration(
    trained: ModelVersion,
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
) -> None:
    with session_factory() as session:
        version = get_version(session, trained.task, 1)
        data = evaluation_data(settings, session, store, tasks.get_task(trained.task))
    fp32 = export_onnx(load_network(store, version, CPU), input_shape(version))
    # Calibrated on raw 12-bit pixel values instead of preprocessed images (a preprocessing
    # bug): the input's int8 step is then ~16, every real image (0..1) quantises to zeros, and
    # the scores no longer rank the studies.
    broken = quantize_int8(fp32, data.calibration * 4095)

    with unit_of_work(session_factory) as session:
        version = get_version(session, trained.task, 1)
        judged = judge_variants(
            settings,
            session,
            store,
            version,
            {VariantRuntime.ONNX_INT8: broken},
            data,
            actor="max",
        )
    int8 = judged[-1]
    assert int8.runtime == VariantRuntime.ONNX_INT8 and not int8.passed
    assert int8.reason.startswith("refused: auc")
    assert int8.metrics["auc_delta"] < -settings.max_variant_auc_drop
    with unit_of_work(session_factory) as session, pytest.raises(VariantError) as refused:
        serve(session, get_version(session, trained.task, 1), "onnx-int8", actor="max")
    assert refused.value.reason == "variant-refused"
    assert "may not serve" in str(refused.value)
    with unit_of_work(session_factory) as session, pytest.raises(VariantError) as missing:
        serve(session, get_version(session, trained.task, 1), "onnx-fp32", actor="max")
    assert missing.value.reason == "no-variant" and "radflow model compress" in str(missing.value)
    with session_factory() as session:
        stored = session.scalars(select(ModelVariant)).all()
        assert not any(v.serving for v in stored)
        assert not session.scalars(select(AuditEvent).where(AuditEvent.action == "serve")).all()


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_variants_need_an_evaluation_set(
    tiny_task: str, settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    with unit_of_work(session_factory) as session:  # a study, but no training yet
        study = make_study(session, store, status=StudyStatus.STABLE)
        add_label(session, study.study_uid, tiny_task, "normal", source="t", author="t")
    with (
        pytest.raises(VariantError, match="radflow train") as error,
        session_factory() as session,
    ):
        evaluation_data(settings, session, store, tasks.get_task(tiny_task))
    assert error.value.reason == "no-evaluation-set"


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_a_kind_without_a_primary_metric_is_refused_before_any_work(
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
) -> None:
    task = tasks.get_task("pneumonia-cxr")
    monkeypatch.setitem(tasks.TASKS, task.name, dataclasses.replace(task, kind="segmentation-3d"))
    # No version exists: the kind is refused before the registry is even read.
    with pytest.raises(VariantError, match="PRIMARY_METRIC") as error:
        compress(settings, session_factory, store, task.name, 1, actor="max")
    assert error.value.reason == "unsupported-kind"


def test_onnx_providers_prefer_tensorrt_then_cuda_and_always_keep_the_cpu() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    everything = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers(cuda, everything) == everything
    assert onnx_providers(cuda, everything[1:]) == everything[1:]
    assert onnx_providers(cuda, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    # A CUDA build on a CPU device, or a GPU that PyTorch does not use: the CPU.
    assert onnx_providers(cpu, everything) == ["CPUExecutionProvider"]
    # This machine's onnxruntime (the CPU build) when no list is given.
    assert onnx_providers(cpu) == ["CPUExecutionProvider"]
