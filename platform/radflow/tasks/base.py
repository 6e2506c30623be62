"""What a task is: everything the platform needs to know to route, preprocess, train and score.

A task is declared once (see ``pneumonia_cxr.py``) and looked up by name; flows, the CLI and the
dashboard never hard-code task details.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from monai.transforms import Compose
from torch import nn


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


@dataclass(frozen=True)
class Task:
    name: str
    kind: Literal["binary-classification"]
    description: str
    labels: tuple[str, str]  # (negative, positive) label values
    route: Route
    spatial_size: tuple[int, ...]
    build_network: Callable[[], nn.Module]
    preprocessing: Callable[[], Compose]
    augmentation: Callable[[], Compose]
    plan: TrainingPlan = field(default_factory=TrainingPlan)

    @property
    def positive(self) -> str:
        return self.labels[1]

    def target(self, label_value: str) -> float:
        """The training target for a stored label value."""
        if label_value not in self.labels:
            raise ValueError(
                f"label {label_value!r} is not valid for task {self.name}; use one of {self.labels}"
            )
        return float(label_value == self.positive)

    def describe(self) -> dict[str, Any]:
        """A JSON-able record of the task as trained (stored with every model version)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "labels": list(self.labels),
            "spatial_size": list(self.spatial_size),
            "network": type(self.build_network()).__name__,
            "plan": self.plan.__dict__,
        }
