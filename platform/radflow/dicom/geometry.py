"""A series as one stack of images: checked and ordered from its instances' geometry alone.

A volume task takes a series, not an image. Whether the series is one volume is decided here,
from what the index keeps of each instance (radflow.dicom.instance.InstanceHeader: size, Image
Type, Image Position/Orientation (Patient), Pixel Spacing, Temporal Position Index), without
reading a file, so routing thousands of studies costs queries, not downloads. A series that is
not one volume gets a :class:`~radflow.errors.NotAVolume` with a stable reason, shown on the
study like "no applicable model":

- ``localizer``: a scout image (Image Type LOCALIZER) is mixed in with the slices;
- ``too-many-voxels``: more voxels than the configured limit (RADFLOW_MAX_VOLUME_VOXELS);
- ``mixed-sizes``: slices of different rows, columns or pixel spacing;
- ``no-geometry``: a slice without a usable position, orientation or pixel spacing;
- ``mixed-orientations``: slices in different planes;
- ``duplicate-positions``: two slices at one position (unless a sequence task takes the series
  as a time series: one position, each image with its own Temporal Position Index);
- ``tilted-stack``: slices not stacked along their normal (gantry tilt, a sheared stack);
- ``missing-slices``: a gap of more than 1.5 times the median spacing;
- ``non-uniform-spacing``: spacings that differ from the median by more than 10 %;
- ``too-few-slices``, ``multi-frame-series``, ``no-instances``.

Slices are ordered along the normal of Image Orientation (Patient) by Image Position (Patient),
never by Instance Number, and the spacing comes from the positions, never Slice Thickness: both
by highdicom (:func:`highdicom.spatial.get_volume_positions`), whose affine
(radflow.dicom.volume) then places the assembled volume in the patient. What is computed here is
only the diagnosis of why a series is not a volume, which highdicom answers with None.

A series of one multi-frame instance (enhanced CT/MR, a cine) keeps its geometry per frame in
functional groups the index does not hold: it is checked when loaded (radflow.dicom.volume).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import highdicom as hd
import numpy as np
from highdicom.spatial import get_normal_vector, get_volume_positions

from radflow.errors import NotAVolume
from radflow.settings import MAX_VOLUME_VOXELS

Axis = Literal["space", "time"]
"""What a stack's first axis runs along: slice positions in the patient, or time."""

GAP_FACTOR = 1.5
"""A spacing this many times the median spacing means slices are missing."""
SPACING_TOLERANCE = 0.1
"""Spacings may differ from the median by this fraction of it (scanners round positions)."""
ORIENTATION_TOLERANCE = 1e-3
"""Largest difference between two slices' direction cosines that still counts as one plane."""
TILT_TOLERANCE = 0.04
"""Largest sideways step from one slice to the next, as a fraction of their spacing, that still
counts as stacked along the normal: a tilt of about 2.3 degrees, within highdicom's own check (the
stacking direction's dot product with the normal within 1e-3 of 1), and well above the jitter of
positions rounded to 0.01 mm."""
MIN_SLICES = 3
"""Fewer images than this are no volume, whatever their geometry."""


@dataclass(frozen=True)
class Slice:
    """One instance of a series as the index knows it (radflow.db.Instance)."""

    object_key: str
    sha256: str
    rows: int | None
    columns: int | None
    frames: int = 1
    image_type: str | None = None
    position: tuple[float, ...] | None = None
    orientation: tuple[float, ...] | None = None
    spacing: tuple[float, ...] | None = None
    temporal: int | None = None

    @property
    def localizer(self) -> bool:
        return "LOCALIZER" in (self.image_type or "").upper().split("\\")


@dataclass(frozen=True)
class SeriesPlan:
    """A series checked to be one stack: its instances in stack order.

    ``axis`` None: the series is one multi-frame instance, whose frames radflow.dicom.volume
    orders (and checks) when it loads them: as a volume, or (``time`` allowed) in time order.
    """

    slices: tuple[Slice, ...]
    axis: Axis | None
    spacing: float  # mm between slices along the normal (space), 1.0 for a time series
    time: bool = False  # whether a time series is acceptable

    @property
    def multiframe(self) -> bool:
        return self.axis is None

    @property
    def digest(self) -> str:
        """What the stack is: the same digest means the same pixels in the same order (the key
        of its preprocessed tensor, radflow.learning.cache)."""
        text = "\n".join([f"{self.axis}:{self.time}", *(s.sha256 for s in self.slices)])
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def depth(self) -> int:
        return sum(s.frames for s in self.slices)

    def affine(self) -> np.ndarray | None:
        """Where the stack's voxels (slice, row, column) lie: 4x4 to LPS mm, as
        radflow.dicom.volume.load_volume places them, from the index alone. None for a
        multi-frame instance or a time series (no geometry per frame in the index)."""
        first = self.slices[0]
        position, orientation, spacing = first.position, first.orientation, first.spacing
        if self.axis != "space" or position is None or orientation is None or spacing is None:
            return None
        geometry = hd.VolumeGeometry.from_attributes(
            image_position=position,
            image_orientation=orientation,
            rows=first.rows or 0,
            columns=first.columns or 0,
            pixel_spacing=spacing,
            spacing_between_slices=self.spacing,
            number_of_frames=len(self.slices),
            coordinate_system="PATIENT",
        )
        return np.asarray(geometry.affine, dtype=np.float64)


def plan_series(
    slices: Sequence[Slice], *, time: bool = False, max_voxels: int = MAX_VOLUME_VOXELS
) -> SeriesPlan:
    """The series as one volume, or NotAVolume saying why it is not.

    ``time``: a time series is acceptable too (a sequence task): images at one position ordered
    by Temporal Position Index.
    """
    if not slices:
        raise NotAVolume("no-instances", "the series has no instances")
    voxels = sum(s.frames * (s.rows or 0) * (s.columns or 0) for s in slices)
    if voxels > max_voxels:
        raise NotAVolume(
            "too-many-voxels",
            f"{voxels:,} voxels exceed the limit of {max_voxels:,} (RADFLOW_MAX_VOLUME_VOXELS)",
        )
    if any(s.frames > 1 for s in slices):
        if len(slices) > 1:
            raise NotAVolume(
                "multi-frame-series",
                f"{len(slices)} instances, multi-frame among them: a volume is one multi-frame "
                "instance or a stack of single-frame ones",
            )
        return SeriesPlan(tuple(slices), None, 1.0, time)
    if localizers := sum(s.localizer for s in slices):
        raise NotAVolume(
            "localizer",
            f"{localizers} of {len(slices)} images are localizers (Image Type LOCALIZER); "
            "the scanner should send scouts as a series of their own",
        )
    if len(slices) < MIN_SLICES:
        raise NotAVolume(
            "too-few-slices", f"{len(slices)} image(s); a volume needs at least {MIN_SLICES}"
        )
    _same_size(slices)
    positions, orientation = _geometry(slices)
    distances = positions @ get_normal_vector(orientation)
    if _duplicates(distances) and time:
        return _time_series(slices, distances)
    return _volume(slices, positions, orientation, distances, time)


def _same_size(slices: Sequence[Slice]) -> None:
    sizes = {(s.rows, s.columns) for s in slices}
    if len(sizes) > 1:
        shown = ", ".join(f"{r}x{c}" for r, c in sorted(sizes, key=str))
        raise NotAVolume("mixed-sizes", f"slices of {len(sizes)} sizes ({shown})")
    spacings = [s.spacing for s in slices if s.spacing is not None]
    if spacings and not np.allclose(spacings, spacings[0], rtol=1e-3, atol=1e-4):
        low, high = min(min(s) for s in spacings), max(max(s) for s in spacings)
        raise NotAVolume(
            "mixed-sizes", f"pixel spacing differs between slices ({low:g} to {high:g} mm)"
        )


def _geometry(slices: Sequence[Slice]) -> tuple[np.ndarray, tuple[float, ...]]:
    """Positions (N, 3) and the common orientation (6 direction cosines)."""
    missing = [
        what
        for what in ("position", "orientation", "spacing")
        if any(getattr(s, what) is None for s in slices)
    ]
    if missing:
        names = {
            "position": "Image Position (Patient)",
            "orientation": "Image Orientation (Patient)",
            "spacing": "Pixel Spacing",
        }
        raise NotAVolume(
            "no-geometry",
            "slices without a usable "
            + ", ".join(names[m] for m in missing)
            + " (instances indexed before Radflow recorded geometry need sending again)",
        )
    orientations = np.array([s.orientation for s in slices], dtype=np.float64)
    deviation = float(np.abs(orientations - orientations[0]).max())
    if deviation > ORIENTATION_TOLERANCE:
        planes = len({tuple(np.round(o, 3)) for o in orientations})
        raise NotAVolume(
            "mixed-orientations",
            f"slices in {planes} orientations (direction cosines differ by up to "
            f"{deviation:.3f}): a series of several planes (e.g. axial and coronal) is not one "
            "volume",
        )
    positions = np.array([s.position for s in slices], dtype=np.float64)
    return positions, tuple(float(v) for v in orientations[0])


def _duplicates(distances: np.ndarray) -> int:
    """How many slices lie at the distance along the normal (to 0.01 mm) of another one."""
    return len(distances) - len(np.unique(np.round(distances, 2)))


def _time_series(slices: Sequence[Slice], distances: np.ndarray) -> SeriesPlan:
    """Images at one position, each with its own Temporal Position Index, in time order."""
    locations = len(np.unique(np.round(distances, 2)))
    times = [s.temporal for s in slices]
    if locations > 1 or None in times or len(set(times)) < len(times):
        what = (
            f"{locations} positions over time (a 4D series)"
            if locations > 1
            else "images at one position without a distinct Temporal Position Index each"
        )
        raise NotAVolume("duplicate-positions", f"{what}: neither one volume nor one time series")
    ordered = sorted(slices, key=lambda s: s.temporal or 0)
    return SeriesPlan(tuple(ordered), "time", 1.0, time=True)


def _volume(
    slices: Sequence[Slice],
    positions: np.ndarray,
    orientation: tuple[float, ...],
    distances: np.ndarray,
    time: bool,
) -> SeriesPlan:
    duplicates = _duplicates(distances)
    if duplicates:
        raise NotAVolume(
            "duplicate-positions",
            f"{duplicates} slice(s) at a position another slice already has (a repeated or "
            "time-resolved acquisition in one series)",
        )
    order = np.argsort(distances)
    steps = np.diff(distances[order])
    median = float(np.median(steps))
    _check_stacked(positions[order], orientation, median)
    gaps = np.flatnonzero(steps > GAP_FACTOR * median)
    if gaps.size:
        lost = int(sum(round(steps[g] / median) - 1 for g in gaps))
        first = int(gaps[0])
        raise NotAVolume(
            "missing-slices",
            f"about {lost} slice(s) missing: a gap of {steps[first]:.2f} mm after slice "
            f"{first + 1} of {len(slices)} where slices are {median:.2f} mm apart (more than "
            f"{GAP_FACTOR}x); resend the whole series",
        )
    spread = float(np.abs(steps - median).max())
    if spread > SPACING_TOLERANCE * median:
        raise NotAVolume(
            "non-uniform-spacing",
            f"slices {steps.min():.2f} to {steps.max():.2f} mm apart, more than "
            f"{SPACING_TOLERANCE:.0%} from the median {median:.2f} mm",
        )
    spacing, indices = get_volume_positions(positions.tolist(), orientation, rtol=SPACING_TOLERANCE)
    if spacing is None or indices is None:  # what the checks above cannot see
        raise NotAVolume("not-a-volume", "highdicom does not find one regular volume in it")
    ordered = [slices[i] for i in np.argsort(indices)]
    return SeriesPlan(tuple(ordered), "space", float(spacing), time=time)


def _check_stacked(ordered: np.ndarray, orientation: tuple[float, ...], spacing: float) -> None:
    normal = get_normal_vector(orientation)
    offsets = ordered - ordered[0]
    sideways = offsets - np.outer(offsets @ normal, normal)
    step = float(np.linalg.norm(np.diff(sideways, axis=0), axis=1).max())
    if step > TILT_TOLERANCE * spacing:
        raise NotAVolume(
            "tilted-stack",
            f"slices shift {step:.2f} mm sideways from one to the next: not stacked along "
            "their normal (gantry tilt?); reconstruct the series without tilt",
        )
