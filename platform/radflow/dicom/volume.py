"""A planned series loaded as one volume: pixels in modality units, placed in the patient.

:func:`load_volume` takes a :class:`~radflow.dicom.geometry.SeriesPlan` (the series checked and
ordered from the index) and reads its instances from the object store:

- single-frame slices are fetched and decoded on a few threads (the store's round trips
  overlap) straight into one preallocated float32 array in plan order, with the modality
  transform (Rescale Slope/Intercept, or a Modality LUT through pydicom) applied; peak memory is
  the volume plus a slice or two per thread;
- one multi-frame instance (enhanced CT/MR with per-frame functional groups) is read by
  highdicom (:meth:`highdicom.Image.get_volume`), which sorts and checks its frames as a volume;
  for a task that takes time series, frames at one position (a cine, a dynamic series) are taken
  in time order instead: by their Temporal Position Index when every frame has one, else as
  stored (a cine's frames are in acquisition order, Frame Time apart).

The affine is highdicom's (:class:`highdicom.Volume`): voxel (slice, row, column) to patient
coordinates in mm, LPS. :meth:`Volume.meta_tensor` hands it to MONAI as a MetaTensor (space
LPS), so Orientation and Spacing transforms see where the voxels are.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_modality_lut

from radflow.dicom.geometry import SPACING_TOLERANCE, Axis, SeriesPlan
from radflow.errors import NotAVolume
from radflow.store import ObjectStore

if TYPE_CHECKING:
    from monai.data import MetaTensor

FETCH_THREADS = 4
"""Threads fetching and decoding slices: on S3 each slice is a round trip, which they overlap."""

_LUMINANCE = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class Volume:
    """A series' pixels as one stack and where it lies.

    ``array``: (depth, rows, columns) float32 modality values (Hounsfield units for CT).
    ``affine``: 4x4, voxel index (slice, row, column) to patient LPS mm. For a time series the
    first axis is time: the affine steps it one mm along the slice normal, a placeholder only.
    """

    array: np.ndarray
    affine: np.ndarray
    axis: Axis
    modality: str | None = None
    window: tuple[float, float] | None = None  # the file's own VOI window (center, width)
    frame_time_ms: float | None = None  # a cine's Frame Time

    def meta_tensor(self) -> MetaTensor:
        """(1, depth, rows, columns) with the affine, for MONAI transforms (no copy)."""
        # Imported here: MONAI costs a process ~350 MB, and loading a volume for display or a
        # benchmark does not need it.
        import torch
        from monai.data import MetaTensor

        return MetaTensor(
            torch.from_numpy(self.array[None]),
            affine=torch.from_numpy(self.affine),
            meta={"space": "LPS", "axis": self.axis},
        )


def load_volume(store: ObjectStore, plan: SeriesPlan, *, threads: int = FETCH_THREADS) -> Volume:
    """The planned series as a volume; NotAVolume if a multi-frame instance's frames are not one
    stack the plan accepts, ObjectNotFound/decoding errors as they come."""
    if plan.axis is None:
        return _multiframe(store.get_bytes(plan.slices[0].object_key), plan.time)
    return _stack(store, plan, plan.axis, threads)


def _stack(store: ObjectStore, plan: SeriesPlan, axis: Axis, threads: int) -> Volume:
    first = plan.slices[0]
    rows, columns = first.rows or 0, first.columns or 0
    array = np.empty((len(plan.slices), rows, columns), dtype=np.float32)

    def fill(index: int) -> Dataset:
        ds = pydicom.dcmread(io.BytesIO(store.get_bytes(plan.slices[index].object_key)))
        _modality_values(ds, array[index])
        del ds.PixelData  # the header is what is kept
        return ds

    with ThreadPoolExecutor(min(threads, len(plan.slices))) as pool:
        headers = list(pool.map(fill, range(len(plan.slices))))
    if first.position is None or first.orientation is None or first.spacing is None:
        raise NotAVolume("no-geometry", "the plan holds no geometry for its first slice")
    placed = hd.Volume.from_attributes(
        array=array,
        image_position=first.position,
        image_orientation=first.orientation,
        pixel_spacing=first.spacing,
        spacing_between_slices=plan.spacing,
        coordinate_system="PATIENT",
    )
    return Volume(
        array, placed.affine, axis, _modality(headers[0]), _window(headers[len(headers) // 2])
    )


def _modality_values(ds: Dataset, out: np.ndarray) -> None:
    """``ds``'s pixels in modality units, written into ``out`` (float32, rows x columns)."""
    if int(ds.get("NumberOfFrames") or 1) != 1:
        raise NotAVolume("multi-frame-series", "a multi-frame instance among the slices")
    pixels = ds.pixel_array
    if pixels.shape != out.shape:
        raise NotAVolume("mixed-sizes", f"a slice of {pixels.shape}, not {out.shape}")
    if "ModalityLUTSequence" in ds:
        out[...] = apply_modality_lut(pixels, ds)
        return
    # Rescale in float32 in place: apply_modality_lut would make a float64 copy per slice.
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0))
    np.multiply(pixels, np.float32(slope), out=out, casting="unsafe")
    out += np.float32(intercept)


def _multiframe(data: bytes, time: bool) -> Volume:
    image = hd.imread(io.BytesIO(data))
    try:
        volume = image.get_volume(dtype=np.float32, rtol=SPACING_TOLERANCE)
    except (ValueError, RuntimeError, AttributeError, KeyError) as exc:
        if not time:
            raise NotAVolume(
                "not-a-volume",
                f"the frames of this multi-frame instance are not one regular volume ({exc})",
            ) from None
        return _time_frames(image)
    array = np.asarray(volume.array, dtype=np.float32)
    if array.ndim == 4:  # colour: (slices, rows, columns, samples)
        array = array @ _LUMINANCE
    return Volume(array, volume.affine, "space", _modality(image), _window(image))


def _time_frames(image: hd.Image) -> Volume:
    """A multi-frame instance's frames in time order, for a sequence task."""
    frames = int(image.get("NumberOfFrames") or 1)
    order = _temporal_order(image, frames)
    array = np.asarray(image.get_frames(order, dtype=np.float32), dtype=np.float32)
    if array.ndim == 4:
        array = array @ _LUMINANCE
    spacing = _in_plane_spacing(image)
    affine = np.diag([1.0, spacing[0], spacing[1], 1.0])
    frame_time = image.get("FrameTime")
    return Volume(
        np.ascontiguousarray(array),
        affine,
        "time",
        _modality(image),
        _window(image),
        float(frame_time) if frame_time not in (None, "") else None,
    )


def _temporal_order(image: Dataset, frames: int) -> list[int]:
    """1-based frame numbers in time order: by each frame's Temporal Position Index (enhanced
    objects' Frame Content), else as stored."""
    per_frame = image.get("PerFrameFunctionalGroupsSequence") or []
    indices: list[int] = []
    for item in per_frame:
        content = item.get("FrameContentSequence") or []
        value = content[0].get("TemporalPositionIndex") if content else None
        if value is None:
            break
        indices.append(int(value))
    if len(indices) == frames and len(set(indices)) == frames:
        return [n + 1 for n in np.argsort(indices, kind="stable")]
    return list(range(1, frames + 1))


def _in_plane_spacing(image: Dataset) -> tuple[float, float]:
    shared = image.get("SharedFunctionalGroupsSequence") or []
    measures = shared[0].get("PixelMeasuresSequence") if shared else None
    spacing = measures[0].get("PixelSpacing") if measures else image.get("PixelSpacing")
    if spacing is None or len(spacing) != 2:
        return 1.0, 1.0
    return float(spacing[0]), float(spacing[1])


def _modality(ds: Dataset) -> str | None:
    value = ds.get("Modality")
    return str(value) if value else None


def _window(ds: Dataset) -> tuple[float, float] | None:
    """The first VOI window the file offers, (center, width), if any."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        shared = ds.get("SharedFunctionalGroupsSequence") or []
        voi = shared[0].get("FrameVOILUTSequence") if shared else None
        if not voi:
            return None
        center, width = voi[0].get("WindowCenter"), voi[0].get("WindowWidth")
        if center is None or width is None:
            return None
    return _first(center), _first(width)


def _first(value: object) -> float:
    values: Sequence[object] = list(value) if isinstance(value, MultiValue) else [value]
    return float(str(values[0]))
