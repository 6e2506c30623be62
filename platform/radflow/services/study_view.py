"""One study as the viewer shows it: its details, series, prediction history and rendered images."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_rescale, apply_voi_lut
from pydicom.pixels.utils import pixel_array
from scipy.ndimage import binary_erosion, map_coordinates
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from radflow.db import (
    Delivery,
    DeliveryStatus,
    Instance,
    Prediction,
    ResultObject,
    Series,
    Study,
    TaskOutcome,
    VariantRuntime,
)
from radflow.db.audit import record
from radflow.errors import RadflowError
from radflow.learning.heatmaps import read_heatmap_volume
from radflow.learning.segmentation import PROBABILITY_KEY
from radflow.services.users import Permission, Principal, require
from radflow.store import ObjectNotFound as ObjectNotFound  # the pages catch it
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
class InstanceRef:
    """One stored image of a series: a slice of a volume, or a whole (multi-frame) object."""

    object_key: str
    frames: int
    # Where the image lies (as indexed): places a volume's heat map on it (heatmap_on_slice).
    position: tuple[float, ...] | None = None
    orientation: tuple[float, ...] | None = None
    pixel_spacing: tuple[float, ...] | None = None


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
    instances: tuple[InstanceRef, ...] = ()
    """In instance-number order: the slice slider walks them."""


@dataclass(frozen=True)
class PredictionView:
    model: str
    task: str
    score: float
    threshold: float
    flagged: bool
    created_at: datetime
    latency_ms: float
    model_version_id: int = 0
    scores: dict[str, float] = field(default_factory=dict)
    """Probability per label value, as the model reported it."""
    derived_keys: dict[str, str] = field(default_factory=dict)
    """Object keys of what the model produced besides the score: "gradcam", "probability"
    (a segmentation's map), "seg", ..."""
    runtime: str = VariantRuntime.TORCH_FP32.value
    """Which variant of the model computed the score (radflow.db.ModelVariant)."""

    @property
    def compressed(self) -> bool:
        return self.runtime != VariantRuntime.TORCH_FP32.value

    @property
    def provenance(self) -> str | None:
        """What the page says when the score came from a compressed variant (None otherwise)."""
        if not self.compressed:
            return None
        maps = "; its heat map from the PyTorch weights" if self.gradcam_key else ""
        return (
            f"Score from the {self.runtime} variant of {self.model}, which passed its "
            f"non-inferiority check against the PyTorch weights{maps}."
        )

    @property
    def gradcam_key(self) -> str | None:
        return self.derived_keys.get("gradcam")

    @property
    def mask_key(self) -> str | None:
        """The map of a segmentation: an image's probability map, or a volume's label map
        (``labels.npz``, drawn by the viewer over the series); radflow.services.mask_review.
        predicted_mask makes the mask at the threshold from either."""
        return self.derived_keys.get(PROBABILITY_KEY)


@dataclass(frozen=True)
class DeliveryView:
    """Where one DICOM result went: sent (when), pending (the next try, the last failure) or
    parked (after how many attempts, and why)."""

    destination: str
    status: str
    attempts: int
    sent_at: datetime | None
    next_attempt_at: datetime | None
    reason: str | None

    def describe(self) -> str:
        if self.status == DeliveryStatus.SENT and self.sent_at is not None:
            return f"{self.destination}: sent {self.sent_at:%Y-%m-%d %H:%M}"
        if self.status == DeliveryStatus.PARKED:
            return f"{self.destination}: parked after {self.attempts} attempt(s): {self.reason}"
        if self.attempts and self.next_attempt_at is not None:
            return (
                f"{self.destination}: pending, next try {self.next_attempt_at:%Y-%m-%d %H:%M} "
                f"(attempt {self.attempts} failed: {self.reason})"
            )
        return f"{self.destination}: {self.status}"


@dataclass(frozen=True)
class ResultView:
    """A DICOM object made from a prediction (SR, SEG), and where it has been sent."""

    kind: str
    model: str
    object_key: str
    created_at: datetime
    deliveries: list[DeliveryView] = field(default_factory=list)

    @property
    def file_name(self) -> str:
        return self.object_key.rsplit("/", 1)[-1]


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
    not_scored: dict[str, str] = field(default_factory=dict)
    """Why each task that gave no score did not (not applicable, e.g. a series that is not one
    volume; or failed), by task: the full reasons ``status_reason`` abbreviates."""
    results: list[ResultView] = field(default_factory=list)
    """DICOM results (SR, SEG) sent to PACS, newest first."""
    unreported: list[str] = field(default_factory=list)
    """Why the SR of a prediction could not be made, newest first."""

    @property
    def latest(self) -> PredictionView | None:
        return self.predictions[0] if self.predictions else None

    @property
    def preview_key(self) -> str | None:
        """The image that stands for the whole study: the first series that has one."""
        return next((s.preview_key for s in self.series if s.preview_key), None)


def view_study(
    session: Session, principal: Principal, study_uid: str, *, audit: bool = True
) -> StudyView:
    """The study page's content, for someone allowed to see studies; the viewing is audited.

    The audit event joins the caller's transaction: commit it (``unit_of_work``). ``audit=False``
    is for redraws of a study already recorded as opened (moving a slider is not a new view).
    """
    require(principal, Permission.VIEW_STUDIES)
    view = get_study_view(session, study_uid)
    if audit:
        session.add(record(principal.name, "view", "study", study_uid))
    return view


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
        not_scored={
            task: reason
            for task, reason in session.execute(
                select(TaskOutcome.task, TaskOutcome.reason)
                .where(TaskOutcome.study_id == study.id)
                .order_by(TaskOutcome.task)
            )
        },
        results=_result_views(session, study.id),
        unreported=_unreported(session, study.id),
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
        instances=tuple(_instance_ref(i) for i in instances),
    )


def _instance_ref(instance: Instance) -> InstanceRef:
    return InstanceRef(
        instance.object_key,
        instance.frames,
        _tuple(instance.image_position),
        _tuple(instance.image_orientation),
        _tuple(instance.pixel_spacing),
    )


def _tuple(values: list[float] | None) -> tuple[float, ...] | None:
    return tuple(float(v) for v in values) if values is not None else None


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
            model_version_id=p.model_version_id,
            scores={str(k): float(v) for k, v in (p.scores or {}).items()},
            derived_keys={str(k): str(v) for k, v in (p.derived_keys or {}).items() if v},
            runtime=VariantRuntime(p.runtime).value,
        )
        for p in predictions
    ]


def _result_views(session: Session, study_id: int) -> list[ResultView]:
    rows = session.execute(
        select(ResultObject, Prediction)
        .join(Prediction, Prediction.id == ResultObject.prediction_id)
        .where(ResultObject.study_id == study_id, ResultObject.object_key.is_not(None))
        .options(selectinload(Prediction.model_version))
        .order_by(ResultObject.created_at.desc(), ResultObject.id.desc())
    ).all()
    deliveries: dict[str, list[DeliveryView]] = {}
    for delivery in session.scalars(
        select(Delivery).where(Delivery.study_id == study_id).order_by(Delivery.id)
    ):
        deliveries.setdefault(delivery.object_key, []).append(
            DeliveryView(
                destination=delivery.destination,
                status=delivery.status.value,
                attempts=delivery.attempts,
                sent_at=delivery.sent_at,
                next_attempt_at=delivery.next_attempt_at,
                reason=delivery.last_error,
            )
        )
    return [
        ResultView(
            kind=result.kind.value.upper(),
            model=prediction.model_version.name,
            object_key=str(result.object_key),
            created_at=result.created_at,
            deliveries=deliveries.get(str(result.object_key), []),
        )
        for result, prediction in rows
    ]


def _unreported(session: Session, study_id: int) -> list[str]:
    return [
        str(error)
        for error in session.scalars(
            select(ResultObject.error)
            .where(ResultObject.study_id == study_id, ResultObject.error.is_not(None))
            .order_by(ResultObject.created_at.desc(), ResultObject.id.desc())
        )
    ]


class ResultNotFound(RadflowError, LookupError):
    def __init__(self, study_uid: str, object_key: str) -> None:
        super().__init__(
            f"{object_key[:200]!r} is not a DICOM result of study {study_uid[:80]}; "
            "choose one from the study's results"
        )


def download_result(
    session: Session, store: ObjectStore, principal: Principal, study_uid: str, object_key: str
) -> bytes:
    """The bytes of one of the study's DICOM results, for someone allowed to see studies.

    Only a result of this study is served (never an arbitrary key); the download is audited
    and joins the caller's transaction. Raises ResultNotFound, or ObjectNotFound when the
    object is missing from the store.
    """
    require(principal, Permission.VIEW_STUDIES)
    known = session.scalar(
        select(ResultObject.id)
        .join(Study, Study.id == ResultObject.study_id)
        .where(Study.study_uid == study_uid, ResultObject.object_key == object_key)
    )
    if known is None:
        raise ResultNotFound(study_uid, object_key)
    data = store.get_bytes(object_key)
    session.add(record(principal.name, "download", "study", study_uid, object_key=object_key))
    return data


def render_image(
    store: ObjectStore, object_key: str, *, window: Window | None = None, frame: int | None = None
) -> NDArray[np.uint8]:
    """A stored DICOM image as 8-bit greyscale for display, bright meaning dense.

    The standard display pipeline (PS3.3 C.11): modality rescale, then the VOI (``window`` as
    (center, width) if given, else the file's own VOI LUT or window, else the full pixel range),
    then MONOCHROME1 inverted. A multi-frame instance shows ``frame`` (0-based, default the
    middle one); colour images are shown as their luminance.
    """
    ds = pydicom.dcmread(io.BytesIO(store.get_bytes(object_key)))
    values = apply_rescale(_display_frame(ds, frame), ds)
    unit = _apply_voi(values, ds, window)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        unit = 1.0 - unit
    return np.rint(unit * 255.0).astype(np.uint8)


def _display_frame(ds: Dataset, frame: int | None) -> NDArray[np.float64]:
    frames = int(ds.get("NumberOfFrames") or 1)
    index = frames // 2 if frame is None else frame
    if not 0 <= index < frames:
        raise ValueError(f"frame {index} does not exist: the image has frames 0..{frames - 1}")
    # Decode only the frame we show: a 500-frame cine or enhanced CT need not be decoded whole.
    arr = pixel_array(ds, index=index) if frames > 1 else ds.pixel_array
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


def adjust_contrast(
    image: NDArray[np.uint8],
    *,
    brightness: float = 0.0,
    contrast: float = 1.0,
    invert: bool = False,
) -> NDArray[np.uint8]:
    """Brightness (-1..1 of the display range) and contrast (a gain around mid-grey) on top of
    the window, the way a viewer's mouse-drag fine tuning works."""
    out = (image.astype(np.float64) - 127.5) * contrast + 127.5 + brightness * 255.0
    out = np.clip(out, 0.0, 255.0)
    if invert:
        out = 255.0 - out
    return np.rint(out).astype(np.uint8)


# "Jet": the colours radiologists know from Grad-CAM papers (blue cold, red hot).
_JET = np.array(
    [
        (0.000, 0.0, 0.0, 0.5),
        (0.125, 0.0, 0.0, 1.0),
        (0.375, 0.0, 1.0, 1.0),
        (0.625, 1.0, 1.0, 0.0),
        (0.875, 1.0, 0.0, 0.0),
        (1.000, 0.5, 0.0, 0.0),
    ]
)
MASK_COLOUR = np.array([0.0, 1.0, 0.3])


class OverlayUnreadable(RadflowError, ValueError):
    """A derived object (heat map, mask) is not an image this viewer can show."""


def load_overlay(
    store: ObjectStore,
    object_key: str,
    shape: tuple[int, int],
    instance: InstanceRef | None = None,
) -> NDArray[np.float64]:
    """A stored heat map or mask (PNG or any PIL format) as floats in [0, 1], resized to ``shape``;
    a volume task's heat map where it crosses the shown image ``instance``
    (:func:`heatmap_on_slice`).

    Raises ObjectNotFound if it is missing and OverlayUnreadable if it is not an image.
    """
    if object_key.endswith(VOLUME_SUFFIX):
        if instance is None:
            raise OverlayUnreadable(f"{object_key} is a volume: say which image it is shown on")
        return heatmap_on_slice(store, object_key, instance, shape)
    try:
        picture = Image.open(io.BytesIO(store.get_bytes(object_key)))
        picture.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise OverlayUnreadable(f"{object_key} is not a readable image: {exc}") from exc
    if picture.mode in ("I", "I;16", "F"):
        values = np.asarray(picture, dtype=np.float64)
        high = float(values.max())
        values = values / high if high > 0 else values
    else:
        values = np.asarray(picture.convert("L"), dtype=np.float64) / 255.0
    if values.shape != shape:
        resized = Image.fromarray(values.astype(np.float32), mode="F").resize(
            (shape[1], shape[0]), Image.Resampling.BILINEAR
        )
        values = np.asarray(resized, dtype=np.float64)
    return np.clip(values, 0.0, 1.0)


VOLUME_SUFFIX = ".npz"
"""A derived object stored under a name ending so is a volume (radflow.learning.heatmaps)."""


def heatmap_on_slice(
    store: ObjectStore, object_key: str, instance: InstanceRef, shape: tuple[int, int]
) -> NDArray[np.float64]:
    """A volume task's heat map where it crosses the image ``instance`` (``shape``: its rows
    and columns), in [0, 1]: each pixel's place in the patient (Image Position/Orientation
    (Patient), Pixel Spacing) looked up in the map through its affine, trilinearly; outside the
    map, 0. Raises ObjectNotFound, or OverlayUnreadable if the map or the image's geometry is
    not usable."""
    try:
        heat, affine = read_heatmap_volume(store.get_bytes(object_key))
    except ValueError as exc:
        raise OverlayUnreadable(f"{object_key}: {exc}") from exc
    if instance.position is None or instance.orientation is None or instance.pixel_spacing is None:
        raise OverlayUnreadable(
            f"{instance.object_key} has no indexed geometry (Image Position/Orientation, Pixel "
            "Spacing) to place the heat map volume on"
        )
    rows, columns = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    row_direction, column_direction = (
        np.array(instance.orientation[:3]),
        np.array(instance.orientation[3:]),
    )
    row_spacing, column_spacing = instance.pixel_spacing
    # A column step moves along the row direction cosines; a row step along the column ones.
    points = (
        np.asarray(instance.position)[:, None, None]
        + row_direction[:, None, None] * (columns * column_spacing)
        + column_direction[:, None, None] * (rows * row_spacing)
    )
    to_voxels = np.linalg.inv(affine)
    voxels = np.tensordot(to_voxels[:3, :3], points, axes=1) + to_voxels[:3, 3, None, None]
    sampled = map_coordinates(heat, voxels, order=1, mode="constant", cval=0.0)
    out: NDArray[np.float64] = np.clip(sampled.astype(np.float64), 0.0, 1.0)
    return out


def heatmap_overlay(
    image: NDArray[np.uint8], heat: NDArray[np.float64], opacity: float
) -> NDArray[np.uint8]:
    """RGB: the image with a jet-coloured heat map; cold regions stay see-through."""
    _check_opacity(opacity)
    colours = np.stack(
        [np.interp(heat, _JET[:, 0], _JET[:, channel]) for channel in (1, 2, 3)], axis=-1
    )
    alpha = (opacity * heat)[..., None]
    return _blend(image, colours, alpha)


def mask_overlay(
    image: NDArray[np.uint8],
    mask: NDArray[np.bool_] | NDArray[np.float64],
    opacity: float,
    *,
    contour: bool = False,
) -> NDArray[np.uint8]:
    """RGB: the image with the segmented region (``mask``: booleans, or values >= 0.5) tinted,
    or only its outline with ``contour``; elsewhere the image is unchanged."""
    _check_opacity(opacity)
    region = np.asarray(mask >= 0.5)
    if contour:
        region &= ~binary_erosion(region, border_value=0)
    alpha = np.where(region, opacity, 0.0)[..., None].astype(np.float64)
    return _blend(image, np.broadcast_to(MASK_COLOUR, (*mask.shape, 3)), alpha)


def _blend(
    image: NDArray[np.uint8], colours: NDArray[np.float64], alpha: NDArray[np.float64]
) -> NDArray[np.uint8]:
    base = np.repeat(image[..., None], 3, axis=-1) / 255.0 if image.ndim == 2 else image / 255.0
    out = base * (1.0 - alpha) + colours * alpha
    return np.rint(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)


def _check_opacity(opacity: float) -> None:
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity {opacity} must be between 0 and 1")
