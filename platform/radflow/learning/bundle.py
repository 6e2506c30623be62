"""Model versions as MONAI bundles: export for use elsewhere, import as a new version.

An exported bundle is a folder ``monai.bundle`` understands:

    configs/metadata.json    MONAI metadata with network_data_format, plus a "radflow" section
                             (task, version, threshold, metrics, label snapshot, code version)
    configs/inference.json   network_def (the task's MONAI network), preprocessing, postprocessing
    models/model.pt          the weights (a state dict)
    models/model.onnx        the network as ONNX (fp32; the version's onnx-fp32 variant if built)
    models/model-int8.onnx   its int8 variant, when the version has one

``ConfigParser`` on ``inference.json`` rebuilds the network; loading ``models/model.pt`` into it
gives the registry version's outputs exactly. The ONNX files take the same preprocessed input
(``network_data_format``) and give the same logit, to which ``postprocessing`` applies; the
metadata's ``optional_packages_version`` names the onnx and onnxruntime they were made with, and
its "radflow" section each variant's measurements and verdict, which import restores.
"""

from __future__ import annotations

import io
import json
import logging
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from monai.bundle import ConfigParser
from sqlalchemy.orm import Session

from radflow.db import ModelStatus, ModelVariant, ModelVersion, VariantRuntime
from radflow.db.audit import record
from radflow.errors import RadflowError
from radflow.learning.compression import FILES, export_onnx
from radflow.learning.inference import input_shape, load_network
from radflow.learning.registry import get_version, register
from radflow.learning.tasks import NetworkSpec, get_task
from radflow.learning.variants import variants_of
from radflow.store import ObjectStore, keys

logger = logging.getLogger(__name__)

METADATA = Path("configs/metadata.json")
INFERENCE = Path("configs/inference.json")
WEIGHTS = Path("models/model.pt")


class InvalidBundle(RadflowError):
    def __init__(self, folder: Path, problem: str) -> None:
        super().__init__(
            f"{folder} is not a MONAI bundle Radflow can import: {problem}. A bundle has "
            f"{METADATA}, {INFERENCE} (with network_def) and {WEIGHTS}."
        )


def export_bundle(
    session: Session, store: ObjectStore, task_name: str, number: int, out: Path, *, actor: str
) -> Path:
    """Write version ``number`` of ``task_name`` as a MONAI bundle folder ``out``."""
    version = get_version(session, task_name, number)
    task = get_task(task_name)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; give a new folder for the bundle")
    (out / METADATA).parent.mkdir(parents=True, exist_ok=True)
    (out / WEIGHTS).parent.mkdir(parents=True, exist_ok=True)
    network = version.config.get("network") or task.network.config()
    (out / INFERENCE).write_text(
        json.dumps(_inference(network, task.preprocessing_config), indent=2)
    )
    variants = variants_of(session, version)
    (out / METADATA).write_text(json.dumps(_metadata(version, variants), indent=2))
    (out / WEIGHTS).write_bytes(store.get_bytes(version.weights_key))
    _write_onnx(store, version, variants, out)
    session.add(record(actor, "export", "model_version", version.name, folder=out.name))
    return out


def _write_onnx(
    store: ObjectStore, version: ModelVersion, variants: list[ModelVariant], out: Path
) -> None:
    """The version's ONNX variants as files of the bundle; model.onnx is exported now if the
    version has no onnx-fp32 variant (it then carries no verdict, and import leaves it out)."""
    files = {v.runtime: v.object_key for v in variants if v.runtime in FILES}
    for runtime, key in files.items():
        (out / "models" / FILES[runtime]).write_bytes(store.get_bytes(key))
    if VariantRuntime.ONNX_FP32 not in files:
        network = load_network(store, version, torch.device("cpu"))
        model = export_onnx(network, input_shape(version))
        (out / "models" / FILES[VariantRuntime.ONNX_FP32]).write_bytes(model)


def _inference(network: dict[str, Any], preprocessing: Any) -> dict[str, Any]:
    return {
        "imports": ["$import torch"],
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": network,
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": json.loads(json.dumps(list(preprocessing))),
        },
        # The network outputs one logit: the probability of the positive label.
        "postprocessing": {"_target_": "Activations", "sigmoid": True},
    }


def _metadata(version: ModelVersion, variants: list[ModelVariant]) -> dict[str, Any]:
    task = get_task(version.task)
    spatial = list(version.config.get("spatial_size", task.spatial_size))
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
        "0.8.1/meta_schema_20220324.json",
        "version": f"{version.version}.0.0",
        "changelog": {f"{version.version}.0.0": f"Radflow {version.name}"},
        "monai_version": package_version("monai"),
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "optional_packages_version": {
            name: package_version(name) for name in ("onnx", "onnxruntime")
        },
        "name": version.task,
        "task": task.description,
        "description": f"{task.description}; trained and exported by Radflow",
        "authors": "Radflow",
        "copyright": "Radflow",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "xray",
                    "num_channels": 1,
                    "spatial_shape": spatial,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": 1,
                    "spatial_shape": [1],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_onehot": False,
                    "channel_def": {"0": task.positive},
                }
            },
        },
        "radflow": {
            "task": version.task,
            "version": version.version,
            "threshold": version.threshold,
            "labels": list(task.labels),
            "metrics": version.metrics,
            "training_run_id": version.training_run_id,
            "code_version": version.code_version,
            "cam_layer": version.config.get("cam_layer"),
            "preprocessing_digest": version.config.get("preprocessing_digest"),
            "variants": [
                {
                    "runtime": v.runtime.value,
                    "file": str(WEIGHTS.parent / FILES.get(v.runtime, WEIGHTS.name)),
                    "size_bytes": v.size_bytes,
                    "metrics": v.metrics,
                    "passed": v.passed,
                    "reason": v.reason,
                }
                for v in variants
            ],
        },
    }


def read_bundle(folder: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """metadata, the network_def config and the weights of a bundle folder."""
    for part in (METADATA, INFERENCE, WEIGHTS):
        if not (folder / part).is_file():
            raise InvalidBundle(folder, f"{part} is missing")
    try:
        metadata = json.loads((folder / METADATA).read_text())
    except json.JSONDecodeError as exc:
        raise InvalidBundle(folder, f"{METADATA} is not JSON ({exc})") from None
    if "network_data_format" not in metadata:
        raise InvalidBundle(folder, "metadata.json has no network_data_format")
    parser = ConfigParser()
    parser.read_config(str(folder / INFERENCE))
    if "network_def" not in parser:
        raise InvalidBundle(folder, "inference.json has no network_def")
    network_def = parser.get("network_def")
    state = torch.load(
        io.BytesIO((folder / WEIGHTS).read_bytes()), map_location="cpu", weights_only=True
    )
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # MONAI's CheckpointSaver layout
    return metadata, network_def, state


def import_bundle(
    session: Session, store: ObjectStore, folder: Path, task_name: str, *, actor: str
) -> ModelVersion:
    """Register a bundle's network and weights as a new version of ``task_name``.

    It becomes champion only when the task has none; otherwise it is a challenger until
    evaluated or promoted by hand.
    """
    task = get_task(task_name)
    metadata, network_def, state = read_bundle(folder)
    shape = metadata["network_data_format"].get("inputs", {}).get("image", {}).get("spatial_shape")
    if shape and list(shape) != list(task.spatial_size):
        raise InvalidBundle(
            folder, f"its input size {shape} is not {task.name}'s {list(task.spatial_size)}"
        )
    if not isinstance(network_def, dict) or "_target_" not in network_def:
        raise InvalidBundle(folder, "network_def must be a {'_target_': ...} config")
    own = metadata.get("radflow", {})
    spec = NetworkSpec.from_config(network_def, own.get("cam_layer"))
    try:
        network = spec.build()
    except (ValueError, TypeError) as exc:
        raise InvalidBundle(folder, f"its network_def cannot be built ({exc})") from None
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise InvalidBundle(folder, f"its weights do not fit its network_def ({exc})") from None
    version = register(
        session,
        store,
        task,
        network,
        metrics={
            **{k: v for k, v in own.get("metrics", {}).items() if k != "decision"},
            "imported_from": f"{metadata.get('name', folder.name)} {metadata.get('version', '')}",
        },
        threshold=float(own.get("threshold", 0.5)),
        training_run=None,
        actor=actor,
    )
    version.config = {**version.config, "network": spec.config(), "cam_layer": spec.cam_layer}
    _restore_variants(session, store, folder, version, own.get("variants", []))
    how = "the task had no champion" if version.status == ModelStatus.CHAMPION else "not evaluated"
    version.metrics = {
        **version.metrics,
        "decision": f"imported MONAI bundle ({how}); metrics are the bundle's own",
    }
    session.add(
        record(
            actor,
            "import",
            "model_version",
            version.name,
            bundle=metadata.get("name"),
            bundle_version=metadata.get("version"),
            status=str(version.status),
        )
    )
    logger.info("imported bundle %s as %s (%s)", folder.name, version.name, version.status)
    if version.status != ModelStatus.CHAMPION:
        logger.info("promote it with `radflow model promote %s %d`", task.name, version.version)
    return version


def _restore_variants(
    session: Session,
    store: ObjectStore,
    folder: Path,
    version: ModelVersion,
    described: list[dict[str, Any]],
) -> None:
    """The bundle's judged variants as variants of the imported ``version``.

    Each keeps the verdict and measurements of the site that made it (as the version keeps the
    bundle's metrics); ``radflow model compress`` judges them again on this site's evaluation
    set. A file the metadata names but the bundle lacks, or that is not ONNX, is refused.
    """
    for entry in described:
        try:
            runtime = VariantRuntime(entry["runtime"])
        except (KeyError, ValueError):
            raise InvalidBundle(folder, f"a variant has an unknown runtime: {entry!r}") from None
        if runtime in FILES:
            path = folder / "models" / FILES[runtime]
            if not path.is_file():
                raise InvalidBundle(folder, f"its {runtime} variant's file {path.name} is missing")
            model = path.read_bytes()
            try:
                onnx.checker.check_model(onnx.load_from_string(model))
            except (onnx.checker.ValidationError, DecodeError) as exc:
                raise InvalidBundle(
                    folder, f"{path.name} is not a valid ONNX model ({exc})"
                ) from None
            key = keys.model(version.task, version.version, FILES[runtime])
            store.put_bytes(key, model)
        else:
            key, model = version.weights_key, b""
        session.add(
            ModelVariant(
                model_version_id=version.id,
                runtime=runtime,
                object_key=key,
                size_bytes=len(model) if model else int(entry.get("size_bytes", 0)),
                metrics=dict(entry.get("metrics", {})),
                passed=bool(entry.get("passed", False)),
                reason=f"imported; judged where the bundle was made: {entry.get('reason')}"[:512],
                serving=False,
            )
        )
    session.flush()
