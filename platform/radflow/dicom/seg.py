"""DICOM Segmentation (SEG): a model's mask over its source instances, written and read back.

Strict writing: :func:`build_segmentation` checks the mask against its source images before
highdicom sees it, so a wrong mask fails with a :class:`SegmentationError` whose ``reason`` is a
stable code and whose message says what to do. Tolerant reading: :func:`read_segmentation`
returns the mask in the order of the source instances it is given, whoever wrote the SEG.

Source instances are one 2D image, one multi-frame image, or a series of single-frame slices;
the mask is ``(rows, cols)``, ``(frames, rows, cols)`` or ``(frames, rows, cols, segments)``
with frame ``i`` over source frame or slice ``i``: booleans, 0/1 of any number type, or
probabilities in [0, 1] for a FRACTIONAL SEG. For several segments, a label map of integers
(``(rows, cols)`` or ``(frames, rows, cols)``, 0 the background, ``n`` segment ``n``) does too:
what an argmax over a network's output channels gives.

An empty mask (no foreground in any segment) is refused with :class:`EmptyMask`, reason
``empty-mask``: a SEG that outlines nothing only clutters the study in a PACS. The caller
stores no SEG; the study's SR still says the model ran and found an area of zero.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, generate_uid

from radflow.dicom.codes import Segment
from radflow.dicom.equipment import MANUFACTURER, Algorithm, software_versions
from radflow.errors import RadflowError
from radflow.store import ObjectStore, keys

SEGMENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.66.4")
SERIES_NUMBER = 9901
"""Series Number of Radflow's SEG series: high, so a PACS lists it after the acquired ones."""
SEG_KEY = "seg"
"""The name under which a prediction's ``derived_keys`` hold its SEG's object key."""

# Patient and study attributes of type 2 (present, may be empty) that highdicom copies from the
# first source image; a modality may have left them out altogether.
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


class SegmentationError(RadflowError, ValueError):
    """A mask or SEG Radflow cannot turn into (or read from) a DICOM Segmentation.

    ``reason`` is a short stable code: mask-shape, mask-values, segment-count, empty-mask,
    sources, not-a-segmentation, unknown-instances, invalid-segmentation.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class EmptyMask(SegmentationError):
    def __init__(self) -> None:
        super().__init__(
            "empty-mask",
            "the mask has no foreground pixel in any segment, so no SEG is written (it would "
            "outline nothing); the study's SR reports an area of zero instead",
        )


@dataclass(frozen=True)
class StoredSegmentation:
    key: str
    sop_instance_uid: str
    series_instance_uid: str


@dataclass(frozen=True)
class SegmentationMask:
    """A SEG read back: ``array`` is ``(frames, rows, cols, segments)`` in the order of the
    source instances (frames) it was read against; bool for BINARY, float32 in [0, 1] for
    FRACTIONAL."""

    array: NDArray[np.bool_] | NDArray[np.float32]
    labels: tuple[str, ...]
    fractional: bool
    sop_instance_uid: str
    pixel_spacing: tuple[float, float] | None
    """(row, column) spacing in mm, when the images have one."""
    slice_spacing: float | None
    """Distance between slices in mm, for a volume whose images have one."""

    def foreground(self) -> NDArray[np.bool_]:
        """The mask as booleans (a fractional one at probability >= 0.5)."""
        if self.fractional:
            return np.asarray(self.array >= 0.5)
        return np.asarray(self.array, dtype=bool)


def build_segmentation(
    sources: Sequence[Dataset],
    mask: NDArray[np.generic],
    segments: Sequence[Segment],
    algorithm: Algorithm,
    *,
    fractional: bool = False,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.seg.Segmentation:
    """A SEG of ``mask`` over ``sources`` (headers suffice), one segment per ``segments`` item.

    ``fractional``: ``mask`` holds probabilities in [0, 1] (FRACTIONAL, PROBABILITY);
    otherwise it must be binary (BINARY). Raises SegmentationError (EmptyMask for a mask with
    no foreground).
    """
    frames, rows, columns = _source_grid(sources)
    if not segments:
        raise SegmentationError("segment-count", "a segmentation needs at least one segment")
    stacked = _stacked(np.asarray(mask), (frames, rows, columns), len(segments), fractional)
    identification = algorithm.seg_identification()
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=segment.label,
            segmented_property_category=segment.category,
            segmented_property_type=segment.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
        )
        for number, segment in enumerate(segments, start=1)
    ]
    try:
        seg = hd.seg.Segmentation(
            source_images=complete_headers(sources),
            pixel_array=stacked,
            segmentation_type="FRACTIONAL" if fractional else "BINARY",
            segment_descriptions=descriptions,
            series_instance_uid=series_instance_uid or generate_uid(),
            series_number=SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid or generate_uid(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=algorithm.name,
            software_versions=software_versions(),
            device_serial_number=algorithm.device,
            series_description=f"AI segmentation {algorithm.device}"[:64],
        )
    except (AttributeError, KeyError, ValueError) as exc:  # a source image highdicom cannot use
        raise SegmentationError(
            "invalid-segmentation",
            f"highdicom cannot build the SEG ({exc}); check the source images",
        ) from exc
    if "FrameOfReferenceUID" not in seg:
        # Without a frame of reference the General Image module requires Patient Orientation
        # (type 2C): a SEG over a radiograph or photograph lies as its one source does.
        seg.PatientOrientation = sources[0].get("PatientOrientation", "")
    return seg


def write_segmentation(
    store: ObjectStore,
    sources: Sequence[Dataset],
    mask: NDArray[np.generic],
    segments: Sequence[Segment],
    algorithm: Algorithm,
    *,
    task: str,
    version: int,
    fractional: bool = False,
) -> StoredSegmentation:
    """Build the SEG (:func:`build_segmentation`) and store it as a derived object of the study.

    The key holds the SOP Instance UID, so a study scored again never overwrites a SEG that may
    already have been sent. Put the key under ``derived_keys[SEG_KEY]`` of the prediction:
    :mod:`radflow.delivery` then reports and sends it. Raises EmptyMask for an empty mask
    (store no key then).
    """
    seg = build_segmentation(sources, mask, segments, algorithm, fractional=fractional)
    key = keys.derived(seg.StudyInstanceUID, task, version, f"seg.{seg.SOPInstanceUID}.dcm")
    store.put_bytes(key, part10(seg), content_type="application/dicom")
    return StoredSegmentation(key, seg.SOPInstanceUID, seg.SeriesInstanceUID)


def part10(dataset: Dataset) -> bytes:
    """``dataset`` as a DICOM Part 10 file."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def load_sources(store: ObjectStore, object_keys: Sequence[str]) -> list[Dataset]:
    """The headers (no pixel data) of stored instances, in the order of ``object_keys``."""
    headers: list[Dataset] = []
    for key in object_keys:
        with store.open(key) as stream:
            headers.append(pydicom.dcmread(stream, stop_before_pixels=True))
    return headers


def complete_headers(sources: Sequence[Dataset]) -> list[Dataset]:
    """Copies of ``sources`` with the type 2 patient and study attributes that highdicom copies
    into a new object present (empty when the modality left them out)."""
    if not sources:
        raise ValueError("a report needs at least one source image")
    completed = []
    for source in sources:
        header = Dataset()
        header.update(source)  # a new dataset, so the caller's is left as it was
        for keyword in _TYPE2_COPIED:
            if keyword not in header:
                setattr(header, keyword, "")
        completed.append(header)
    return completed


def _source_grid(sources: Sequence[Dataset]) -> tuple[int, int, int]:
    """(frames, rows, columns) the mask must have for ``sources``."""
    if not sources:
        raise SegmentationError("sources", "a SEG needs at least one source image")
    sizes = {(int(s.Rows), int(s.Columns)) for s in sources}
    if len(sizes) > 1:
        raise SegmentationError(
            "sources", f"the source images differ in size ({sorted(sizes)}); use one series"
        )
    frames = [int(s.get("NumberOfFrames") or 1) for s in sources]
    if len(sources) > 1 and max(frames) > 1:
        raise SegmentationError(
            "sources",
            "the sources mix multi-frame and several images; give one multi-frame image or a "
            "series of single-frame slices",
        )
    count = frames[0] if len(sources) == 1 else len(sources)
    if count > 1 and any("FrameOfReferenceUID" not in s for s in sources):
        raise SegmentationError(
            "sources",
            f"the {count} source frames or images have no frame of reference, so nothing places "
            "them in one volume; a SEG without one covers a single image: write one per image",
        )
    rows, columns = sizes.pop()
    return count, rows, columns


def _stacked(
    mask: NDArray[np.generic], grid: tuple[int, int, int], segments: int, fractional: bool
) -> NDArray[np.bool_] | NDArray[np.float32]:
    """``mask`` as (frames, rows, columns, segments), checked against the images' grid."""
    frames, rows, columns = grid
    array = mask[None] if mask.ndim == 2 else mask
    if array.ndim == 3 and segments == 1:
        array = array[..., None]
    elif array.shape == grid and array.dtype.kind in "iu" and not fractional:
        array = _one_hot(array, segments)
    if array.ndim != 4 or array.shape[:3] != grid:
        raise SegmentationError(
            "mask-shape",
            f"the mask has shape {mask.shape} but its images need ({frames}, {rows}, {columns}"
            f"{', ' + str(segments) if segments > 1 else ''}) (frames, rows, columns"
            f"{', segments' if segments > 1 else ''}); resample the mask onto the image grid",
        )
    if array.shape[3] != segments:
        raise SegmentationError(
            "segment-count",
            f"the mask has {array.shape[3]} segment channel(s) but {segments} segment(s) are "
            "described; describe one segment per channel",
        )
    values = _checked_values(array, fractional)
    if not values.any():
        raise EmptyMask()
    return values


def _one_hot(labels: NDArray[np.generic], segments: int) -> NDArray[np.bool_]:
    """A label map (0 background, ``n`` segment ``n``) as one boolean channel per segment."""
    if labels.min() < 0 or labels.max() > segments:
        raise SegmentationError(
            "mask-values",
            f"a label map for {segments} segments holds 0 (background) to {segments}, not "
            f"{labels.min()} to {labels.max()}; describe one segment per label",
        )
    return np.stack([labels == number for number in range(1, segments + 1)], axis=-1)


def _checked_values(
    array: NDArray[np.generic], fractional: bool
) -> NDArray[np.bool_] | NDArray[np.float32]:
    if array.dtype.kind == "b":
        return np.asarray(array, dtype=bool)
    if array.dtype.kind not in "iuf":
        raise SegmentationError("mask-values", f"a mask of {array.dtype} values is not a mask")
    values = np.asarray(array, dtype=np.float32)
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise SegmentationError(
            "mask-values", "mask values must lie in [0, 1] (no NaN): probabilities or 0/1"
        )
    if fractional:
        return values
    if not np.isin(values, (0.0, 1.0)).all():
        raise SegmentationError(
            "mask-values",
            "the mask holds probabilities but a BINARY SEG was asked for: threshold it, or "
            "write it with fractional=True",
        )
    return np.asarray(values > 0)


def read_segmentation(data: bytes, sources: Sequence[Dataset]) -> SegmentationMask:
    """The mask of a SEG over ``sources`` (the images it was made from, in frame order).

    Raises SegmentationError: ``not-a-segmentation`` for other bytes, ``unknown-instances`` when
    the SEG references an instance that is not among ``sources`` (another study's, or an image
    Radflow never received).
    """
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError) as exc:
        raise SegmentationError(
            "not-a-segmentation", f"not a readable DICOM file ({exc}); upload a DICOM SEG"
        ) from exc
    sop_class = ds.get("SOPClassUID")
    if sop_class != SEGMENTATION_STORAGE:
        what = UID(sop_class).name if sop_class else "DICOM file without a SOP Class"
        raise SegmentationError(
            "not-a-segmentation", f"the file is a {what}, not a DICOM Segmentation; upload a SEG"
        )
    _check_references(ds, sources)
    pixel_spacing, slice_spacing = _spacing(ds)
    _tolerate_missing_slice_thickness(ds)
    try:
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
        array = _source_ordered(seg, sources)
    except (AttributeError, KeyError, ValueError) as exc:
        raise SegmentationError(
            "invalid-segmentation", f"the SEG cannot be read ({exc}); export it again"
        ) from exc
    fractional = seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
    return SegmentationMask(
        array=array.astype(np.float32) if fractional else array.astype(bool),
        labels=tuple(str(d.SegmentLabel) for d in seg.SegmentSequence),
        fractional=fractional,
        sop_instance_uid=str(ds.SOPInstanceUID),
        pixel_spacing=pixel_spacing,
        slice_spacing=slice_spacing,
    )


def referenced_instances(ds: Dataset) -> set[str]:
    """SOP Instance UIDs a SEG names as its sources (series references and per-frame ones)."""
    uids = {
        str(instance.ReferencedSOPInstanceUID)
        for series in ds.get("ReferencedSeriesSequence", [])
        for instance in series.get("ReferencedInstanceSequence", [])
    }
    for frame in ds.get("PerFrameFunctionalGroupsSequence", []):
        for derivation in frame.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                uids.add(str(source.ReferencedSOPInstanceUID))
    return uids


def _check_references(ds: Dataset, sources: Sequence[Dataset]) -> None:
    known = {str(s.SOPInstanceUID) for s in sources}
    referenced = referenced_instances(ds)
    if not referenced:
        raise SegmentationError(
            "unknown-instances", "the SEG names no source image; export it with its references"
        )
    if unknown := sorted(referenced - known):
        raise SegmentationError(
            "unknown-instances",
            f"the SEG references {len(unknown)} instance(s) that are not images of this study "
            f"(first: {unknown[0]}); make the SEG from this study's images",
        )


def _source_ordered(seg: hd.seg.Segmentation, sources: Sequence[Dataset]) -> NDArray[np.generic]:
    numbers = [int(d.SegmentNumber) for d in seg.SegmentSequence]
    if len(sources) == 1 and int(sources[0].get("NumberOfFrames") or 1) > 1:
        source = sources[0]
        frames: NDArray[np.generic] = seg.get_pixels_by_source_frame(
            source_sop_instance_uid=source.SOPInstanceUID,
            source_frame_numbers=range(1, int(source.NumberOfFrames) + 1),
            segment_numbers=numbers,
            assert_missing_frames_are_empty=True,
            rescale_fractional=True,
        )
        return frames
    return seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[s.SOPInstanceUID for s in sources],
        segment_numbers=numbers,
        assert_missing_frames_are_empty=True,
        rescale_fractional=True,
    )


def _spacing(ds: Dataset) -> tuple[tuple[float, float] | None, float | None]:
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    measures = shared.get("PixelMeasuresSequence", [Dataset()])[0]
    pixel = measures.get("PixelSpacing")
    between = measures.get("SpacingBetweenSlices") or measures.get("SliceThickness")
    return (
        (float(pixel[0]), float(pixel[1])) if pixel else None,
        float(between) if between else None,
    )


def _tolerate_missing_slice_thickness(ds: Dataset) -> None:
    """highdicom 0.28.2 reads Pixel Measures only with a Slice Thickness, which PS3.3
    C.7.6.16.2.1 requires only with a Frame of Reference; a SEG over a radiograph or photograph
    (Radflow's too) has none. Such a SEG's Pixel Measures are dropped from the in-memory copy
    (the spacing was read before); a SEG with a Frame of Reference is read as it is."""
    if "FrameOfReferenceUID" in ds:
        return
    groups = [*ds.get("SharedFunctionalGroupsSequence", [])]
    groups += [*ds.get("PerFrameFunctionalGroupsSequence", [])]
    for item in groups:
        measures = item.get("PixelMeasuresSequence")
        if measures and "SliceThickness" not in measures[0]:
            del item.PixelMeasuresSequence
