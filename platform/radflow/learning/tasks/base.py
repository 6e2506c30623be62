"""What a task is: everything the platform needs to know to route, preprocess, train and score.

A task is declared once (see ``pneumonia_cxr.py``) and looked up by name; flows, the CLI and the
dashboard never hard-code task details.

The seams for the task kinds are here, not in the callers: ``kind`` names the family
(``binary-classification`` on one 2D image and 2D ``segmentation``; ``classification-3d``,
``sequence-classification`` and ``segmentation-3d`` on a series assembled into a volume,
radflow.dicom.volume; ``image-enhancement`` is declared, not built), ``network`` is a MONAI
config (so a bundle can be exported and re-imported for any network), ``inference`` and
``window`` say how a network sees an image (whole, or through a sliding window for images larger
than a patch), and ``operating_point`` / ``evaluation`` say how a version is judged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pydoc import locate
from typing import TYPE_CHECKING, Any, Literal

# MONAI and PyTorch are imported where a network or a transform is built, not here: the task
# registry is read by light commands too (`radflow label` validates a value against the task's
# labels), and importing MONAI costs seconds.
if TYPE_CHECKING:
    from monai.transforms import Compose
    from torch import nn

from radflow.dicom.codes import ResultCoding

TaskKind = Literal[
    "binary-classification",  # one 2D image (the middle frame of a multi-frame instance)
    "segmentation",  # 2D: a mask per image (radflow.learning.segmentation)
    "classification-3d",  # a series as one volume
    "sequence-classification",  # a series as an ordered stack: slices in space, or frames in time
    "segmentation-3d",  # a mask per series, voxel by voxel (radflow.learning.segmentation too)
    # Declared so that configuration and code paths can name it; not built yet.
    "image-enhancement",
]

SERIES_KINDS = frozenset({"classification-3d", "sequence-classification", "segmentation-3d"})
"""The kinds whose input is a whole series (radflow.dicom.geometry), not one image."""
SEGMENTATION_KINDS = frozenset({"segmentation", "segmentation-3d"})
"""The kinds whose result is a mask: one code path (radflow.learning.segmentation) for both,
the spatial dimensions from the task's window."""


@dataclass(frozen=True)
class Route:
    """Which series a task applies to (empty set: any value matches)."""

    modalities: frozenset[str] = frozenset()
    body_parts: frozenset[str] = frozenset()

    def matches(self, modality: str | None, body_part: str | None) -> str | None:
        """None when the series matches, else the reason it does not."""
        if self.modalities and (modality or "").upper() not in self.modalities:
            return f"modality {modality or '(none)'} not in {sorted(self.modalities)}"
        if self.body_parts and (body_part or "").upper() not in self.body_parts:
            return f"body part {body_part or '(none)'} not in {sorted(self.body_parts)}"
        return None


@dataclass(frozen=True)
class TrainingPlan:
    epochs: int = 12
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    min_labels: int = 20
    # Segmentation: patches drawn from each training image per epoch (half centred on the
    # structure, half on any pixel of the region that counts).
    patches_per_image: int = 16
    # Segmentation: validate (sliding window over every evaluation image) after every Nth epoch
    # and the last; the best validated epoch is kept. Validation of a few large images can cost
    # as much as an epoch of patches.
    validate_every: int = 1


@dataclass(frozen=True)
class SlidingWindow:
    """How a segmentation network sees an image larger than its patch (MONAI
    ``SlidingWindowInferer``): ``roi_size`` is also the training patch size; ``mode`` "gaussian"
    weighs each window's centre over its borders where windows overlap, "constant" averages."""

    roi_size: tuple[int, ...]
    overlap: float = 0.5
    mode: Literal["gaussian", "constant"] = "gaussian"
    sigma_scale: float = 0.125
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError("sliding-window overlap must be in [0, 1)")


@dataclass(frozen=True)
class NetworkSpec:
    """A MONAI network as a bundle-style config: ``target`` class and its keyword arguments.

    Keeping the network as data (not a closure) is what lets a version be exported as a MONAI
    bundle whose ``inference.json`` rebuilds exactly this network, and a stored version be
    rebuilt after the task's declared network changed. :meth:`build` is the one way Radflow
    turns such a config into a module (tasks, the registry and imported bundles alike).
    """

    target: str
    args: Mapping[str, Any]
    # The layer whose activations Grad-CAM weighs (last convolutional block); None: no maps.
    cam_layer: str | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], cam_layer: str | None = None) -> NetworkSpec:
        """From a ``{"_target_": ..., **args}`` config (a MONAI bundle's ``network_def``)."""
        if "_target_" not in config:
            raise ValueError("a network config needs a '_target_' naming its class")
        args = {k: v for k, v in config.items() if k != "_target_"}
        return cls(_qualified(str(config["_target_"])), args, cam_layer)

    def build(self) -> nn.Module:
        """The network. Only a torch module class is instantiated: a config (from a bundle
        someone sends) that names any other callable is refused before it is called."""
        from torch import nn

        cls = locate(_qualified(self.target))
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"network target {self.target!r} is not an importable torch module")
        return cls(**self.args)

    def config(self) -> dict[str, Any]:
        """The ``network_def`` of a MONAI bundle (JSON types only)."""
        return {"_target_": self.target, **json.loads(json.dumps(dict(self.args)))}


def _qualified(target: str) -> str:
    """The full dotted name of ``target``: MONAI configs may name its components by class name
    alone ("Classifier"), which MONAI's own locator resolves."""
    if "." in target:
        return target
    from monai.bundle.config_item import ComponentLocator

    module = ComponentLocator().get_component_module_name(target)
    if isinstance(module, list):  # several MONAI modules export the name: take the first
        module = module[0]
    return f"{module}.{target}" if module else target


TransformConfig = Mapping[str, Any]


def hounsfield_window(window: tuple[float, float]) -> TransformConfig:
    """The windowing step of a CT task: Hounsfield units from ``window`` (low, high) onto
    0..1, clipped."""
    low, high = window
    return {
        "_target_": "ScaleIntensityRange",
        "a_min": low,
        "a_max": high,
        "b_min": 0.0,
        "b_max": 1.0,
        "clip": True,
    }


MASK_PREFIX = "mask:"
"""How a segmentation label's value starts: ``mask:<digest>`` names its stored mask
(radflow.learning.masks)."""


def compose(configs: tuple[TransformConfig, ...]) -> Compose:
    """MONAI transforms from bundle-style configs (``{"_target_": "Resize", ...}``).

    Declaring deterministic preprocessing as data means the exported MONAI bundle's
    ``inference.json`` preprocessing is exactly the platform's.
    """
    from monai import transforms as monai_transforms

    steps = []
    for config in configs:
        args = {k: v for k, v in config.items() if k != "_target_"}
        cls = getattr(monai_transforms, str(config["_target_"]))
        steps.append(cls(**args))
    return monai_transforms.Compose(steps)


@dataclass(frozen=True)
class OperatingPoint:
    """How the score threshold is chosen on validation data: balancing sensitivity and
    specificity (``youden``), the most accurate cut (``max-accuracy``), the highest cut that
    reaches ``target_sensitivity``, or (segmentation) the pixel threshold with the best Dice
    (``max-dice``)."""

    policy: Literal["youden", "max-accuracy", "target-sensitivity", "max-dice"] = "youden"
    target_sensitivity: float = 0.9

    def __post_init__(self) -> None:
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise ValueError("target_sensitivity must be in (0, 1]")


@dataclass(frozen=True)
class EvaluationPolicy:
    """Which studies form the task's fixed evaluation set (frozen on the first training).

    Labels carrying ``split`` (an imported dataset's validation split) form it when present;
    otherwise the patients held out by the first training do. Later trainings never learn from it,
    so every version is compared on the same studies.
    """

    split: str = "val"


@dataclass(frozen=True)
class Task:
    name: str
    kind: TaskKind
    description: str
    labels: tuple[str, str]  # (negative, positive) label values
    route: Route
    spatial_size: tuple[int, ...]
    network: NetworkSpec
    # Deterministic, run on every image (training, scoring, export); MONAI configs.
    preprocessing_config: tuple[TransformConfig, ...]
    augmentation: Callable[[], Compose]
    plan: TrainingPlan = field(default_factory=TrainingPlan)
    metrics: tuple[str, ...] = ("auc", "accuracy", "sensitivity", "specificity", "ece")
    operating_point: OperatingPoint = field(default_factory=OperatingPoint)
    evaluation: EvaluationPolicy = field(default_factory=EvaluationPolicy)
    inference: Literal["whole-image", "sliding-window"] = "whole-image"
    # Segmentation: patch size and sliding-window inference (required for that kind).
    window: SlidingWindow | None = None
    # How results are coded in the SR and SEG sent to a PACS (radflow.dicom.sr, .seg).
    coding: ResultCoding = field(default_factory=ResultCoding)
    # Bump when the preprocessing code changes in a way its parameters do not show: it is part
    # of the cache key of preprocessed tensors.
    preprocessing_version: int = 1

    def build_network(self) -> nn.Module:
        return self.network.build()

    @property
    def takes_series(self) -> bool:
        """Whether the task's input is a whole series assembled into a volume."""
        return self.kind in SERIES_KINDS

    @property
    def segmentation(self) -> bool:
        """Whether the task's result is a mask (2D or 3D), its labels stored masks."""
        return self.kind in SEGMENTATION_KINDS

    @property
    def takes_time_series(self) -> bool:
        """Whether images at one position in time order (a cine) are an input too."""
        return self.kind == "sequence-classification"

    def preprocessing(self) -> Compose:
        return compose(self.preprocessing_config)

    @property
    def positive(self) -> str:
        return self.labels[1]

    def target(self, label_value: str) -> float:
        """The training target for a stored label value (a segmentation label: always 1)."""
        if self.segmentation:
            if not label_value.startswith(MASK_PREFIX):
                raise ValueError(
                    f"a label of segmentation task {self.name} is a stored mask "
                    f"({MASK_PREFIX}<digest>), not {label_value!r}; import or upload a mask"
                )
            return 1.0
        if label_value not in self.labels:
            raise ValueError(
                f"label {label_value!r} is not valid for task {self.name}; use one of {self.labels}"
            )
        return float(label_value == self.positive)

    def preprocessing_digest(self) -> str:
        """Identifies what ``preprocessing`` does: same digest, same tensors from the same bytes."""
        steps = json.loads(json.dumps(list(self.preprocessing_config), default=repr))
        text = json.dumps(
            [self.kind, list(self.spatial_size), self.preprocessing_version, steps],
            sort_keys=True,
            default=repr,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """A JSON-able record of the task as trained (stored with every model version)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "labels": list(self.labels),
            "spatial_size": list(self.spatial_size),
            "network": self.network.config(),
            "cam_layer": self.network.cam_layer,
            "plan": self.plan.__dict__,
            "operating_point": self.operating_point.__dict__,
            "preprocessing_digest": self.preprocessing_digest(),
            **({"window": self.window.__dict__} if self.window else {}),
        }
