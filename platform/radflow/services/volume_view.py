"""One series as the study page's viewer shows it: its voxels packed for the browser, where they
lie, the windows that fit it, and the layers drawn over it.

The viewer (dashboard/viewer) receives all of a series once and scrolls, reformats and windows it
in the browser, so a step through the slices costs no server round trip. What it receives:

- the voxels in modality units (HU for CT) as 16-bit integers, ``value = stored * slope +
  intercept`` (integral values that fit, as CT's, are sent as they are: slope 1, intercept 0),
  each slice as its low bytes then its high bytes (the high bytes of a CT are nearly constant,
  the low ones noise: apart they deflate to 40 % of the slice, together to 50 %), deflated on its
  own (zlib), so the browser inflates the slice it shows first and the others after it;
- the volume turned, without resampling, so that its axes run toward the feet, the back and the
  patient's left (:data:`AXES`): an axial slice is then seen from the feet with the patient's
  right on the screen's left, a coronal one from the front, a sagittal one from the patient's
  left (the radiological convention), and reformats are plain strides through the array;
- the spacing of those axes (the aspect of each reformat) and the plane the series was acquired
  in (the view it opens on);
- layers over it, resampled onto a coarser copy of its grid: a heat map (a volume task's
  Grad-CAM) or a label map (a segmentation), 8-bit, deflated.

Reading and packing a 200-slice CT takes the server a second or two; :func:`load_preview` reads
the one file the viewer opens on, so the page can show it at once and the rest after it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from math import ceil
from typing import Any, Literal, TypeVar

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from scipy.ndimage import affine_transform
from sqlalchemy import select
from sqlalchemy.orm import Session

from radflow.db import Series
from radflow.dicom.geometry import SeriesPlan, plan_series
from radflow.dicom.volume import Volume, load_volume
from radflow.errors import NotAVolume, RadflowError
from radflow.ingest.routing import series_slices
from radflow.learning.heatmaps import read_heatmap_volume, read_label_volume
from radflow.settings import MAX_VOLUME_VOXELS
from radflow.store import ObjectStore

Window = tuple[float, float]
"""A VOI window as (center, width), in modality units (HU for CT)."""

CT_WINDOWS: dict[str, Window] = {
    "Lung": (-600.0, 1500.0),
    "Mediastinum": (50.0, 350.0),
    "Bone": (400.0, 1800.0),
    "Brain": (40.0, 80.0),
    "Abdomen": (40.0, 400.0),
}
"""Common CT windows in Hounsfield units: meaningless for any other modality."""
FROM_THE_IMAGE = "From the image"
AUTO = "Auto"

AXES = "FPL"
"""Where the sent volume's axes point (highdicom's patient orientation letters): feet,
posterior, left."""
PLANES = ("axial", "coronal", "sagittal")
"""The view along each axis of :data:`AXES`."""

MAX_PAYLOAD_BYTES = 150_000_000
"""The packed voxels a page may send: Streamlit refuses messages over 200 MB."""
LEVEL = 1
"""zlib level: the fastest; CT compresses about as well at 1 as at 6, in a quarter of the time."""
THREADS = 2
"""Slices compressed at once: zlib and numpy release the GIL."""
HEAT_CELLS = 128
"""A heat map layer has at most this many voxels along each axis (it is smooth anyway)."""
LABEL_CELLS = 256
"""A label map layer has at most this many along each axis (contours stay close to the edge)."""

_INT16 = np.iinfo(np.int16)
_T = TypeVar("_T")


class VolumeTooLarge(RadflowError):
    def __init__(self, size: int) -> None:
        super().__init__(
            f"the series packs to {size / 1e6:.0f} MB, more than the viewer takes "
            f"({MAX_PAYLOAD_BYTES / 1e6:.0f} MB): it is shown image by image"
        )


def window_presets(modality: str | None) -> list[str]:
    """The windows offered for an image of ``modality``: its own (or the full range), and the
    CT presets only for CT (a Hounsfield window on an MR image shows nothing useful)."""
    presets = [FROM_THE_IMAGE]
    if (modality or "").upper() == "CT":
        presets += list(CT_WINDOWS)
    return presets


def preset_window(name: str) -> Window | None:
    """The window a preset of :func:`window_presets` names; None: the image's own."""
    return CT_WINDOWS.get(name)


@dataclass(frozen=True)
class Layer:
    """A map drawn over the volume: ``kind`` "heat" (0-255, drawn in jet colours, transparent
    where cold) or "labels" (0 outside, 1-255 a label each, drawn filled or as contours)."""

    name: str
    kind: Literal["heat", "labels"]
    shape: tuple[int, int, int]
    factors: tuple[int, int, int]
    """How many of the volume's voxels one of the layer's spans, along each axis."""
    data: bytes
    """zlib of the uint8 map, C order, on a grid spanning the volume's (:func:`layer_grid`)."""

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "factors": list(self.factors),
        }


@dataclass(frozen=True)
class VolumeView:
    """A series packed for the viewer (see the module doc)."""

    series_uid: str
    modality: str | None
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: NDArray[np.float64]
    acquired: str
    slope: float
    intercept: float
    windows: dict[str, Window]
    data: bytes
    ends: tuple[int, ...]
    """Where each slice's zlib stream ends in ``data`` (slice i is ``data[ends[i-1]:ends[i]]``)."""
    first: int | None = None
    """A preview (:func:`load_preview`): ``data`` holds this slice alone, the one the viewer
    opens on; the geometry is the whole volume's."""

    def describe(self) -> dict[str, Any]:
        """What the browser needs besides ``data``: JSON."""
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "acquired": self.acquired,
            "slope": self.slope,
            "intercept": self.intercept,
            "ends": list(self.ends),
            "first": self.first,
            "windows": [
                {"name": name, "center": center, "width": width}
                for name, (center, width) in self.windows.items()
            ],
        }


def load_volume_view(
    session: Session,
    store: ObjectStore,
    series_uid: str,
    *,
    max_voxels: int = MAX_VOLUME_VOXELS,
    threads: int = THREADS,
) -> VolumeView:
    """The series packed for the viewer. NotAVolume if it is not one volume (the page shows it
    image by image), VolumeTooLarge if it packs to more than a page may send."""
    plan, modality = _plan(session, series_uid, max_voxels)
    volume = load_volume(store, plan, threads=threads)
    if volume.axis != "space":
        raise NotAVolume("not-a-volume", "the series is a time series, not a volume")
    return pack(volume, series_uid, modality or volume.modality, threads=threads)


def load_preview(
    session: Session, store: ObjectStore, series_uid: str, *, max_voxels: int = MAX_VOLUME_VOXELS
) -> VolumeView | None:
    """The slice the viewer opens on, alone, with the whole volume's geometry: one file read,
    so the page shows it at once while :func:`load_volume_view` packs the rest.

    None for a series whose first view needs every file (acquired in another plane than axial:
    the axial view opens on a reformat; one multi-frame instance). NotAVolume as
    :func:`load_volume_view`, from the index alone."""
    plan, modality = _plan(session, series_uid, max_voxels)
    first = plan.slices[0]
    if plan.axis is None or first.position is None or first.orientation is None:
        return None
    geometry = hd.VolumeGeometry.from_attributes(
        image_position=first.position,
        image_orientation=first.orientation,
        rows=first.rows or 0,
        columns=first.columns or 0,
        pixel_spacing=first.spacing or (1.0, 1.0),
        spacing_between_slices=plan.spacing,
        number_of_frames=len(plan.slices),
        coordinate_system="PATIENT",
    )
    if _acquired_plane(geometry) != "axial":
        return None
    turned = geometry.to_patient_orientation(AXES)
    shown = turned.spatial_shape[0] // 2
    # Which acquired slice that is: the sent grid's slice, back in the acquired grid.
    index = np.linalg.inv(geometry.affine) @ turned.affine @ np.array([shown, 0.0, 0.0, 1.0])
    one = SeriesPlan((plan.slices[round(float(index[0]))],), plan.axis, plan.spacing)
    alone = pack(load_volume(store, one), series_uid, modality)
    return replace(
        alone,
        shape=turned.spatial_shape,
        spacing=tuple(float(s) for s in turned.spacing),  # type: ignore[arg-type]
        affine=np.asarray(turned.affine, dtype=np.float64),
        first=shown,
    )


def _plan(session: Session, series_uid: str, max_voxels: int) -> tuple[SeriesPlan, str | None]:
    """The series checked to be one volume from the index (NotAVolume if not), its modality."""
    series_id, modality = session.execute(
        select(Series.id, Series.modality).where(Series.series_uid == series_uid)
    ).one()
    slices = series_slices(session, [series_id]).get(series_id, [])
    return plan_series(slices, max_voxels=max_voxels), modality


def pack(
    volume: Volume, series_uid: str, modality: str | None, *, threads: int = THREADS
) -> VolumeView:
    """``volume`` turned to :data:`AXES` and packed (see the module doc)."""
    placed = hd.Volume(volume.array, volume.affine, coordinate_system="PATIENT")
    acquired = _acquired_plane(placed)
    turned = placed.to_patient_orientation(AXES)
    array = turned.array
    slope, intercept, chunks = _deflate(array, threads)
    ends = tuple(int(e) for e in np.cumsum([len(c) for c in chunks]))
    if ends[-1] > MAX_PAYLOAD_BYTES:
        raise VolumeTooLarge(ends[-1])
    windows = {FROM_THE_IMAGE: volume.window or _auto_window(array)}
    presets = {n: w for n in window_presets(modality) if (w := preset_window(n)) is not None}
    if presets:
        windows |= presets
    elif volume.window is not None:
        windows[AUTO] = _auto_window(array)
    return VolumeView(
        series_uid=series_uid,
        modality=modality,
        shape=(int(array.shape[0]), int(array.shape[1]), int(array.shape[2])),
        spacing=tuple(float(s) for s in turned.spacing),  # type: ignore[arg-type]
        affine=np.asarray(turned.affine, dtype=np.float64),
        acquired=acquired,
        slope=slope,
        intercept=intercept,
        windows=windows,
        data=b"".join(chunks),
        ends=ends,
    )


def _acquired_plane(placed: hd.Volume | hd.VolumeGeometry) -> str:
    """The plane the slices were acquired in: the view along the axis the stack runs along."""
    letter = str(placed.get_closest_patient_orientation()[0].value)
    for plane, pair in zip(PLANES, ("FH", "PA", "LR"), strict=True):
        if letter in pair:
            return plane
    raise ValueError(f"unexpected patient orientation letter {letter!r}")


def _deflate(array: NDArray[Any], threads: int) -> tuple[float, float, list[bytes]]:
    """(slope, intercept, one zlib stream per slice of int16 values): integral values within
    int16 as they are, anything else scaled onto the int16 range."""

    def exact(index: int) -> bytes | None:
        values = np.empty(array.shape[1:], dtype="<i2")
        np.copyto(values, array[index], casting="unsafe")
        if not np.array_equal(values, array[index]):  # a fraction, or out of range
            return None
        return _planes(values)

    chunks = _parallel(exact, len(array), threads)
    if all(c is not None for c in chunks):
        return 1.0, 0.0, [c for c in chunks if c is not None]
    low, high = float(array.min()), float(array.max())
    slope = (high - low) / (int(_INT16.max) - int(_INT16.min)) or 1.0
    intercept = low - int(_INT16.min) * slope

    def scaled(index: int) -> bytes:
        return _planes(np.rint((array[index] - intercept) / slope).astype("<i2"))

    return slope, intercept, _parallel(scaled, len(array), threads)


def _planes(values: NDArray[np.int16]) -> bytes:
    """One slice's zlib stream: its low bytes, then its high bytes."""
    pairs = values.view(np.uint8).reshape(-1, 2)
    return zlib.compress(np.concatenate([pairs[:, 0], pairs[:, 1]]).tobytes(), LEVEL)


def _parallel(work: Callable[[int], _T], count: int, threads: int) -> list[_T]:
    # zlib and numpy release the GIL: slices compress side by side.
    with ThreadPoolExecutor(max(1, min(threads, count))) as pool:
        return list(pool.map(work, range(count)))


def _auto_window(array: NDArray[Any]) -> Window:
    """A window over the 0.5-99.5 percentiles of the values (a sample of them: a percentile of
    50 million voxels would cost a second)."""
    sample = np.asarray(array[:: max(1, len(array) // 16)], dtype=np.float32).ravel()[::7]
    low, high = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    return (low + high) / 2, max(high - low, 1.0)


Grid = tuple[tuple[int, int, int], tuple[int, int, int], NDArray[np.float64]]
"""A layer's grid: its shape, its voxel's size in the volume's voxels, its affine."""


def layer_grid(view: VolumeView, cells: int) -> Grid:
    """A grid over the volume with at most ``cells`` voxels per axis, each an integer number of
    the volume's voxels wide: its shape, factors and affine (voxel index to patient mm)."""
    f0, f1, f2 = factors = [max(1, ceil(n / cells)) for n in view.shape]
    d, r, c = view.shape
    # Voxel i of the layer covers voxels i*f .. i*f+f-1 of the volume: its centre is at
    # i*f + (f-1)/2 in the volume's voxel coordinates.
    scaling = np.eye(4)
    scaling[:3, :3] = np.diag(factors)
    scaling[:3, 3] = [(f - 1) / 2 for f in factors]
    return (ceil(d / f0), ceil(r / f1), ceil(c / f2)), (f0, f1, f2), view.affine @ scaling


def resample_layer(
    values: NDArray[Any],
    affine: NDArray[np.float64],
    view: VolumeView,
    *,
    cells: int,
    order: Literal[0, 1],
) -> tuple[Grid, NDArray[np.uint8]]:
    """``values`` (placed by ``affine``) where they fall on :func:`layer_grid` of ``view``:
    trilinear (``order`` 1) or nearest (0); 0 outside them. The grid, and the 8-bit values."""
    grid = layer_grid(view, cells)
    shape, _, target = grid
    to_source = np.linalg.inv(affine) @ target
    out = affine_transform(
        np.asarray(values, dtype=np.float32),
        to_source[:3, :3],
        offset=to_source[:3, 3],
        output_shape=shape,
        order=order,
        mode="constant",
        cval=0.0,
    )
    return grid, np.clip(np.rint(out), 0, 255).astype(np.uint8)


class LayerUnreadable(RadflowError, ValueError):
    """A stored map is not a volume the viewer can draw."""


def heat_layer(store: ObjectStore, object_key: str, view: VolumeView, name: str) -> Layer:
    """A volume task's stored heat map (radflow.learning.heatmaps) as a layer over ``view``.

    ObjectNotFound if it is missing, LayerUnreadable if it is not a heat map volume."""
    try:
        heat, affine = read_heatmap_volume(store.get_bytes(object_key))
    except ValueError as exc:
        raise LayerUnreadable(f"{object_key}: {exc}") from exc
    grid, values = resample_layer(heat * 255.0, affine, view, cells=HEAT_CELLS, order=1)
    return Layer(name, "heat", grid[0], grid[1], zlib.compress(values.tobytes(), LEVEL))


def label_layer(store: ObjectStore, object_key: str, view: VolumeView, name: str) -> Layer:
    """A stored label map (radflow.learning.heatmaps) as a layer over ``view``.

    ObjectNotFound if it is missing, LayerUnreadable if it is not a label map volume."""
    try:
        labels, affine = read_label_volume(store.get_bytes(object_key))
    except ValueError as exc:
        raise LayerUnreadable(f"{object_key}: {exc}") from exc
    grid, values = resample_layer(labels, affine, view, cells=LABEL_CELLS, order=0)
    return Layer(name, "labels", grid[0], grid[1], zlib.compress(values.tobytes(), LEVEL))
