"""MONAI bundles: an exported version loads with monai.bundle and gives the registry's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from monai.bundle import ConfigParser
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import ModelStatus, VariantRuntime, unit_of_work
from radflow.learning import tasks
from radflow.learning.bundle import InvalidBundle, export_bundle, import_bundle
from radflow.learning.compression import (
    EvaluationData,
    export_onnx,
    judge_variants,
    quantize_int8,
)
from radflow.learning.inference import load_network
from radflow.learning.registry import get_version, register
from radflow.learning.variants import variants_of
from radflow.settings import Settings
from radflow.store import ObjectStore

TASK = tasks.get_task("pneumonia-cxr")


def test_exported_bundle_loads_with_monai_and_imports_as_a_new_version(
    session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    with unit_of_work(session_factory) as session:
        register(
            session,
            store,
            TASK,
            TASK.build_network(),
            metrics={"auc": 0.9},
            threshold=0.42,
            training_run=None,
        )
        export_bundle(session, store, TASK.name, 1, tmp_path / "bundle", actor="tester")

    folder = tmp_path / "bundle"
    metadata = json.loads((folder / "configs/metadata.json").read_text())
    assert metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32]
    assert metadata["radflow"]["threshold"] == pytest.approx(0.42)

    # A plain MONAI user: parse the inference config, load the weights, run it.
    parser = ConfigParser()
    parser.read_config(str(folder / "configs/inference.json"))
    parser["device"] = "$torch.device('cpu')"
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(folder / "models/model.pt", map_location="cpu"))
    network.eval()
    preprocessing = parser.get_parsed_content("preprocessing")
    image = torch.as_tensor(preprocessing(torch.rand(28, 28).numpy() * 4000)).unsqueeze(0)

    with session_factory() as session:
        registry_net = load_network(store, get_version(session, TASK.name, 1), torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(network(image), registry_net(image))

    with unit_of_work(session_factory) as session:
        imported = import_bundle(session, store, folder, TASK.name, actor="tester")
        assert (imported.version, imported.status) == (2, ModelStatus.CHALLENGER)
    with session_factory() as session:
        imported_version = get_version(session, TASK.name, 2)
        again = load_network(store, imported_version, torch.device("cpu"))
        # Without variants in the registry the bundle still carries the network as ONNX, but
        # nothing judged it: import restores no variant from it.
        assert (folder / "models/model.onnx").is_file()
        assert variants_of(session, imported_version) == []
    with torch.no_grad():
        torch.testing.assert_close(again(image), registry_net(image))


def test_a_bundle_carries_the_onnx_variants_and_import_restores_them(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    network = TASK.build_network().eval()
    images = torch.rand(16, 1, *TASK.spatial_size)
    data = EvaluationData(images, np.arange(16) % 2, images.numpy()[:8])
    fp32 = export_onnx(network, (1, *TASK.spatial_size))
    models = {
        VariantRuntime.ONNX_FP32: fp32,
        VariantRuntime.ONNX_INT8: quantize_int8(fp32, data.calibration),
    }
    with unit_of_work(session_factory) as session:
        version = register(
            session, store, TASK, network, metrics={}, threshold=0.5, training_run=None
        )
        made = judge_variants(settings, session, store, version, models, data, actor="tester")
        verdicts = [(v.runtime, v.passed, v.size_bytes) for v in made]
        export_bundle(session, store, TASK.name, 1, tmp_path / "bundle", actor="tester")

    folder = tmp_path / "bundle"
    metadata = json.loads((folder / "configs/metadata.json").read_text())
    assert set(metadata["optional_packages_version"]) == {"onnx", "onnxruntime"}
    described = metadata["radflow"]["variants"]
    assert [(d["runtime"], d["file"]) for d in described] == [
        ("torch-fp32", "models/model.pt"),
        ("onnx-fp32", "models/model.onnx"),
        ("onnx-int8", "models/model-int8.onnx"),
    ]
    assert (folder / "models/model-int8.onnx").read_bytes() == models[VariantRuntime.ONNX_INT8]
    # A plain ONNX Runtime user: the bundle's model.onnx gives the network's logits.
    session_ = ort.InferenceSession(str(folder / "models/model.onnx"))
    (logits,) = session_.run(None, {"image": images.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, network(images).numpy(), atol=1e-5)

    with unit_of_work(session_factory) as session:
        imported = import_bundle(session, store, folder, TASK.name, actor="tester")
        restored = variants_of(session, imported)
        assert [(v.runtime, v.passed, v.size_bytes) for v in restored] == verdicts
        assert all(v.reason.startswith("imported") and not v.serving for v in restored)
        assert restored[0].object_key == imported.weights_key
        for variant in restored[1:]:
            assert variant.object_key.startswith(f"models/{TASK.name}/v2/")
            assert store.get_bytes(variant.object_key) == models[variant.runtime]


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_a_folder_that_is_not_a_bundle_is_refused_with_the_layout(
    session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    with unit_of_work(session_factory) as session, pytest.raises(InvalidBundle, match="metadata"):
        import_bundle(session, store, tmp_path, TASK.name, actor="tester")
