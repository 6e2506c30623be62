"""One study as the viewer shows it: its details, series, prediction history and rendered images."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_rescale, apply_voi_lut
from pydicom.pixels.utils import pixel_array
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from radflow.db import Prediction, Series, Study
from radflow.errors import RadflowError
from radflow.store import ObjectStore

Window = tuple[float, float]
"""A VOI window as (center, width), in the image's output units (e.g. HU for CT)."""


class StudyNotFound(RadflowError, LookupError):
    """No study has this Study Instance UID."""

    def __init__(self, study_uid: str) -> None:
        super().__init__(
            f"no study with Study Instance UID {study_uid[:80]!r}; "
            "it may not have been received yet (see the worklist)"
        )
        self.study_uid = study_uid


@dataclass(frozen=True)
class SeriesView:
    series_uid: str
    number: int | None
    modality: str | None
    description: str | None
    body_part: str | None
    instance_count: int
    preview_key: str | None
    """Object key of the instance to show for the series (the middle one), None if it has none."""


@dataclass(frozen=True)
class PredictionView:
    model: str
    task: str
    score: float
    threshold: float
    flagged: bool
    created_at: datetime
    latency_ms: float


@dataclass(frozen=True)
class StudyView:
    study_uid: str
    accession: str | None
    patient: str
    modality: str | None
    study_date: str | None
    description: str | None
    status: str
    status_reason: str | None
    received_at: datetime
    series: list[SeriesView] = field(default_factory=list)
    predictions: list[PredictionView] = field(default_factory=list)
    """Newest first."""

    @property
    def latest(self) -> PredictionView | None:
        return self.predictions[0] if self.predictions else None

    @property
    def preview_key(self) -> str | None:
        """The image that stands for the whole study: the first series that has one."""
        return next((s.preview_key for s in self.series if s.preview_key), None)


def get_study_view(session: Session, study_uid: str) -> StudyView:
    """Everything the study page shows; raises StudyNotFound for an unknown UID."""
    study = session.scalar(
        select(Study)
        .where(Study.study_uid == study_uid)
        .options(
            selectinload(Study.patient),
            selectinload(Study.series).selectinload(Series.instances),
        )
    )
    if study is None:
        raise StudyNotFound(study_uid)
    return StudyView(
        study_uid=study.study_uid,
        accession=study.accession_number,
        patient=study.patient.pseudonym,
        modality=study.modality,
        study_date=study.study_date,
        description=study.description,
        status=study.status.value,
        status_reason=study.status_reason,
        received_at=study.received_at,
        series=[_series_view(s) for s in study.series],
        predictions=_prediction_views(session, study.id),
    )


def _series_view(series: Series) -> SeriesView:
    instances = series.instances
    return SeriesView(
        series_uid=series.series_uid,
        number=series.number,
        modality=series.modality,
        description=series.description,
        body_part=series.body_part,
        instance_count=len(instances),
        preview_key=instances[len(instances) // 2].object_key if instances else None,
    )


def _prediction_views(session: Session, study_id: int) -> list[PredictionView]:
    predictions = session.scalars(
        select(Prediction)
        .where(Prediction.study_id == study_id)
        .options(selectinload(Prediction.model_version))
        .order_by(Prediction.created_at.desc(), Prediction.id.desc())
    )
    return [
        PredictionView(
            model=p.model_version.name,
            task=p.task,
            score=p.score,
            threshold=p.model_version.threshold,
            flagged=p.score >= p.model_version.threshold,
            created_at=p.created_at,
            latency_ms=p.latency_ms,
        )
        for p in predictions
    ]


def render_image(
    store: ObjectStore, object_key: str, *, window: Window | None = None
) -> NDArray[np.uint8]:
    """A stored DICOM image as 8-bit greyscale for display, bright meaning dense.

    The standard display pipeline (PS3.3 C.11): modality rescale, then the VOI (``window`` as
    (center, width) if given, else the file's own VOI LUT or window, else the full pixel range),
    then MONOCHROME1 inverted. A multi-frame instance shows its middle frame; colour images are
    shown as their luminance.
    """
    ds = pydicom.dcmread(io.BytesIO(store.get_bytes(object_key)))
    values = apply_rescale(_display_frame(ds), ds)
    unit = _apply_voi(values, ds, window)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        unit = 1.0 - unit
    return np.rint(unit * 255.0).astype(np.uint8)


def _display_frame(ds: Dataset) -> NDArray[np.float64]:
    frames = int(ds.get("NumberOfFrames") or 1)
    # Decode only the frame we show: a 500-frame cine or enhanced CT need not be decoded whole.
    arr = pixel_array(ds, index=frames // 2) if frames > 1 else ds.pixel_array
    if arr.ndim == 3:  # (rows, cols, samples): colour, converted to RGB by pydicom
        arr = arr[..., :3] @ np.array([0.299, 0.587, 0.114])
    return np.asarray(arr, dtype=np.float64)


def _apply_voi(
    values: NDArray[np.float64], ds: Dataset, window: Window | None
) -> NDArray[np.float64]:
    """Map modality values to [0, 1] through the chosen VOI."""
    if window is not None:
        return _linear_window(values, *window)
    if _is_monochrome(ds) and "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        mapped = apply_voi_lut(np.rint(values).astype(np.int64), ds)
        return np.asarray(mapped, dtype=np.float64) / float(2**bits - 1)
    if _is_monochrome(ds) and "WindowCenter" in ds and "WindowWidth" in ds:
        return _linear_window(values, _first(ds.WindowCenter), _first(ds.WindowWidth))
    return _full_range(values)


def _linear_window(values: NDArray[np.float64], center: float, width: float) -> NDArray[np.float64]:
    """The DICOM LINEAR window function (PS3.3 C.11.2.1.2.1) scaled to [0, 1]."""
    if width < 1:
        raise ValueError(f"window width {width} must be at least 1")
    out = (values - (center - 0.5)) / (width - 1 or 1) + 0.5
    return np.clip(out, 0.0, 1.0)


def _full_range(values: NDArray[np.float64]) -> NDArray[np.float64]:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def _first(value: Any) -> float:
    # WindowCenter/Width are multi-valued when the file offers several presets; use the first.
    return float(value[0] if isinstance(value, MultiValue) else value)


def _is_monochrome(ds: Dataset) -> bool:
    return str(ds.get("PhotometricInterpretation", "")).startswith("MONOCHROME")
