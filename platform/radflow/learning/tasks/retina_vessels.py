"""retina-vessels: the blood vessels of a colour fundus photograph, pixel by pixel (DRIVE)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydicom.sr.coding import Code

from radflow.dicom.codes import ResultCoding, Segment
from radflow.learning.tasks.base import (
    EvaluationPolicy,
    NetworkSpec,
    OperatingPoint,
    Route,
    SlidingWindow,
    Task,
    TrainingPlan,
)

if TYPE_CHECKING:
    from monai.transforms import Compose

PATCH = (64, 64)

# A MONAI U-Net with four resolutions and residual units: vessels are thin (1-10 px), so the
# network keeps full resolution at its first level; a 64 px patch sees a vessel and its
# surroundings, and sliding windows with Gaussian weighting join patches without seams.
NETWORK = NetworkSpec(
    target="monai.networks.nets.UNet",
    args={
        "spatial_dims": 2,
        "in_channels": 3,
        "out_channels": 1,
        "channels": (16, 32, 64, 128),
        "strides": (2, 2, 2),
        "num_res_units": 1,
        "dropout": 0.0,
    },
)

# Colour photographs: channels first, each image scaled by its own percentiles (illumination
# differs between cameras and patients). No resizing: the mask maps 1:1 onto the source pixels.
PREPROCESSING = (
    {"_target_": "EnsureChannelFirst", "channel_dim": -1},
    {
        "_target_": "ScaleIntensityRangePercentiles",
        "lower": 0.5,
        "upper": 99.5,
        "b_min": 0.0,
        "b_max": 1.0,
        "clip": True,
        "channel_wise": True,
    },
)


def _augmentation() -> Compose:
    # MONAI imported here: the registry is read by commands that never train (`radflow label`).
    from monai.transforms import Compose, RandAdjustContrastd, RandFlipd, RandRotate90d

    # A fundus has no preferred orientation at the scale of a patch: flips and quarter turns.
    keys = ["image", "label"]
    return Compose(
        [
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandRotate90d(keys, prob=0.5),
            RandAdjustContrastd(["image"], prob=0.3, gamma=(0.8, 1.25)),
        ]
    )


TASK = Task(
    name="retina-vessels",
    kind="segmentation",
    description="Retinal blood vessels on a colour fundus photograph (2D segmentation)",
    labels=("background", "vessel"),
    route=Route(modalities=frozenset({"OP", "XC"})),
    spatial_size=PATCH,
    network=NETWORK,
    preprocessing_config=PREPROCESSING,
    augmentation=_augmentation,
    plan=TrainingPlan(
        epochs=80,
        batch_size=16,
        learning_rate=3e-3,
        val_fraction=0.2,
        min_labels=4,
        patches_per_image=48,
    ),
    metrics=("dice", "hd95", "auc", "accuracy", "sensitivity", "specificity"),
    operating_point=OperatingPoint(policy="max-dice"),
    evaluation=EvaluationPolicy(split="val"),
    inference="sliding-window",
    window=SlidingWindow(roi_size=PATCH, overlap=0.5, mode="gaussian", batch_size=16),
    coding=ResultCoding(
        segments=(
            Segment(
                "Retinal vessels",
                Code("91723000", "SCT", "Anatomical structure"),
                Code("59820001", "SCT", "Blood vessel"),
            ),
        ),
    ),
)
