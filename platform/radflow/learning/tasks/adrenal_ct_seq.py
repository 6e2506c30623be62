"""adrenal-ct-seq: adrenal-ct-3d's question, answered by a 2D CNN per slice and an LSTM over them.

The sources' recurrent model family for image sequences, on the same data as adrenal-ct-3d so
the two kinds are compared side by side. The same kind takes a time series as well: frames at
one position in time order (a cine, or a dynamic series by Temporal Position Index).
"""

from __future__ import annotations

from radflow.learning.tasks.adrenal_ct_3d import (
    CODING,
    LABELS,
    OPERATING_POINT,
    ROUTE,
    SPATIAL_SIZE,
    WINDOW_HU,
    augmentation,
)
from radflow.learning.tasks.base import NetworkSpec, Task, TrainingPlan, hounsfield_window

# The stack as acquired (slices in order along their normal, or frames in time), not
# reoriented: the order is the sequence the network reads. Windowed, then resized to 28 steps
# of 28x28 images.
PREPROCESSING = (
    hounsfield_window(WINDOW_HU),
    {"_target_": "Resize", "spatial_size": list(SPATIAL_SIZE), "mode": "area"},
)

NETWORK = NetworkSpec(
    target="radflow.learning.networks.SliceSequenceClassifier",
    args={
        "in_channels": 1,
        "classes": 1,
        "channels": (16, 32, 64),
        # Halving each slice at once: at full resolution the first unit cost 5x the rest, 12 s
        # per batch of 32 volumes on one core (the 3D CNN: 0.8 s; stride 2 here: 2.4 s), over
        # 300 s an epoch on the shared machine, far beyond the 15-minute training budget.
        "strides": (2, 2, 2),
        "hidden": 64,
        "rnn": "lstm",
        "bidirectional": True,
        "dropout": 0.1,
    },
    cam_layer="features",
)

TASK = Task(
    name="adrenal-ct-seq",
    kind="sequence-classification",
    description="Adrenal mass in an abdominal CT series (2D CNN per slice + LSTM, binary)",
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
