"""adrenal-ct-3d: is there an adrenal mass in this abdominal CT volume? (3D CNN)

Trained and measured on AdrenalMNIST3D (MedMNIST v2: 28x28x28 adrenal shapes from CT, normal
gland or mass), imported as CT series (``radflow import npz FILE --task adrenal-ct-3d``). Its
8-bit values are an abdominal window (radflow.ingest.importers), which the preprocessing below
undoes: received CT in Hounsfield units and imported volumes reach the network alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydicom.sr.coding import Code

from radflow.dicom.codes import ResultCoding
from radflow.dicom.writer import ABDOMEN_WINDOW, window_range
from radflow.learning.tasks.base import (
    NetworkSpec,
    OperatingPoint,
    Route,
    Task,
    TrainingPlan,
    hounsfield_window,
)

if TYPE_CHECKING:
    from monai.transforms import Compose

SPATIAL_SIZE = (28, 28, 28)

# The abdominal soft-tissue window (level 40, width 400 HU), which imported 8-bit volumes span.
WINDOW_HU = window_range(ABDOMEN_WINDOW)

ROUTE = Route(
    modalities=frozenset({"CT"}),
    body_parts=frozenset(
        {"ABDOMEN", "ABDOMENPELVIS", "CHESTABDOMEN", "CHESTABDPELVIS", "ADRENAL", ""}
    ),
)
LABELS = ("normal", "mass")

# The whole series, turned to one canonical orientation (slices from inferior to superior,
# rows to posterior, columns to the patient's left: as the volumes MONAI readers give in LPS),
# windowed, and resized to the network's input like a 2D task's image. Orientation needs the
# series' affine: the volume arrives as a MONAI MetaTensor (radflow.dicom.volume).
PREPROCESSING = (
    {"_target_": "Orientation", "axcodes": "SPL", "labels": None},
    hounsfield_window(WINDOW_HU),
    {"_target_": "Resize", "spatial_size": list(SPATIAL_SIZE), "mode": "area"},
)

# A residual 3D CNN (MONAI Classifier) halving the volume four times (28 -> 2 voxels); batch
# norm, one residual unit per level. net.layer_2 (4x4x4 voxels) is the Grad-CAM layer: the last
# one (2x2x2) is too coarse to show where in the volume the evidence lies.
NETWORK = NetworkSpec(
    target="monai.networks.nets.Classifier",
    args={
        "in_shape": (1, *SPATIAL_SIZE),
        "classes": 1,
        "channels": (16, 32, 64, 128),
        "strides": (2, 2, 2, 2),
        "num_res_units": 1,
        "norm": "BATCH",
        "dropout": 0.1,
    },
    cam_layer="net.layer_2",
)


# Accuracy is this dataset's published figure (MedMNIST), with masses about 1 in 5: Youden's cut
# (sensitivity = specificity) calls many normal glands masses (carved train split: ACC 0.72 at
# Youden, 0.85 at the most accurate cut on val, benchmarks/accuracy.py --carve 0.2).
OPERATING_POINT = OperatingPoint(policy="max-accuracy")

# The SR reports the positive label as a mass (SNOMED CT, as pydicom's concept dictionary lists
# it); the procedure is left generic (imaging).
CODING = ResultCoding(finding=Code("4147007", "SCT", "Mass"))


def augmentation() -> Compose:
    """Mirror images along every axis: left and right glands are mirror images, and the same
    shape may lie either way up. (A random affine per volume cost more than the network.)"""
    from monai.transforms import Compose, RandFlip

    return Compose([RandFlip(prob=0.5, spatial_axis=axis) for axis in range(3)])


TASK = Task(
    name="adrenal-ct-3d",
    kind="classification-3d",
    description="Adrenal mass in an abdominal CT volume (3D CNN, binary)",
    labels=LABELS,
    route=ROUTE,
    spatial_size=SPATIAL_SIZE,
    network=NETWORK,
    preprocessing_config=PREPROCESSING,
    augmentation=augmentation,
    plan=TrainingPlan(epochs=15, batch_size=32, learning_rate=2e-3),
    operating_point=OPERATING_POINT,
    coding=CODING,
)
