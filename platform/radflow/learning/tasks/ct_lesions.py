"""ct-lesions: focal lesions in a CT volume, voxel by voxel (3D segmentation).

Trained and tested on synthetic CT (demo.synthetic_ct.lesion_case: a torso phantom with
ellipsoids of raised attenuation, the ground-truth mask made alongside); any CT series that is
one volume routes to it. The same code path as the 2D segmentation kind
(radflow.learning.segmentation): patches for training, MONAI's sliding window for validation
and scoring, the spatial dimensions taken from the window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydicom.sr.coding import Code

from radflow.dicom.codes import ResultCoding, Segment
from radflow.dicom.writer import ABDOMEN_WINDOW, window_range
from radflow.learning.tasks.base import (
    NetworkSpec,
    OperatingPoint,
    Route,
    SlidingWindow,
    Task,
    TrainingPlan,
    hounsfield_window,
)

if TYPE_CHECKING:
    from monai.transforms import Compose

PATCH = (64, 64, 64)
WINDOW_HU = window_range(ABDOMEN_WINDOW)

# A small 3D U-Net (MONAI), three halvings and one residual unit per level: 0.15 M parameters,
# which a 2-core CPU trains in minutes and runs over a 512x512x200 CT in about a minute. Lesions
# are blobs a few mm to a few cm across: a 64-voxel patch holds one whole. Batch norm, not
# MONAI's default instance norm: its statistics are fixed at inference, so the network sees a
# window of any size as it saw its training patches (with instance norm, trained on 16-voxel
# patches, it marked 6x the lesion voxels of a 128x128x40 CT through 64-voxel windows).
NETWORK = NetworkSpec(
    target="monai.networks.nets.UNet",
    args={
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 1,
        "channels": (8, 16, 32, 64),
        "strides": (2, 2, 2),
        "num_res_units": 1,
        "norm": "BATCH",
        "dropout": 0.0,
    },
)

# Hounsfield units through the abdominal window, nothing spatial: the mask (and its SEG) maps
# 1:1 onto the series' voxels in plan order, so no resampling back is needed.
PREPROCESSING = (hounsfield_window(WINDOW_HU),)


def _augmentation() -> Compose:
    from monai.transforms import Compose, RandFlipd, RandRotate90d, RandScaleIntensityd

    # Lesions have no preferred side or direction: flips along every axis, quarter turns in
    # the slice plane (slices are often thicker than pixels are wide), a little contrast.
    keys = ["image", "label"]
    return Compose(
        [
            *[RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)],
            RandRotate90d(keys, prob=0.5, spatial_axes=(1, 2)),
            RandScaleIntensityd(["image"], factors=0.1, prob=0.3),
        ]
    )


TASK = Task(
    name="ct-lesions",
    kind="segmentation-3d",
    description="Focal lesions in a CT volume (3D U-Net, sliding-window segmentation)",
    labels=("background", "lesion"),
    route=Route(modalities=frozenset({"CT"})),
    spatial_size=PATCH,
    network=NETWORK,
    preprocessing_config=PREPROCESSING,
    augmentation=_augmentation,
    plan=TrainingPlan(
        epochs=40,
        batch_size=4,
        learning_rate=3e-3,
        val_fraction=0.2,
        min_labels=4,
        patches_per_image=8,
        validate_every=5,
    ),
    metrics=("dice", "hd95", "auc", "accuracy", "sensitivity", "specificity"),
    operating_point=OperatingPoint(policy="max-dice"),
    inference="sliding-window",
    # A quarter overlap: a 512x512x200 CT is ~480 windows of 64^3 (half overlap: ~1,350).
    window=SlidingWindow(roi_size=PATCH, overlap=0.25, mode="gaussian", batch_size=4),
    coding=ResultCoding(
        segments=(
            Segment(
                "Lesion",
                Code("49755003", "SCT", "Morphologically abnormal structure"),
                Code("52988006", "SCT", "Lesion"),
            ),
        ),
    ),
)
