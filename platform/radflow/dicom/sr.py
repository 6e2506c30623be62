"""DICOM Structured Reports: what a model concluded about a study, as a TID 1500 Measurement
Report in a Comprehensive 3D SR.

- Classification: one measurement group with the finding (the concept of the task's positive
  label), its probability, the threshold, whether the probability reaches it (presence) and
  the model version (Algorithm Identification), over the image that was scored.
- Segmentation: one group per segment with its area (one image or frame) or volume (a series
  or multi-frame image), referencing the segment in its SEG; a segment that outlines nothing
  (no SEG at all for an empty mask, see :mod:`radflow.dicom.seg`) gets a group with zero area
  over the source images and presence "absent".
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import UID, generate_uid

from radflow.dicom.codes import (
    ABSENT,
    AREA,
    CUBIC_MILLIMETER,
    DEVICE,
    IMAGING_PROCEDURE,
    NO_UNITS,
    PIXELS,
    PRESENCE,
    PRESENT,
    PROBABILITY,
    SQUARE_MILLIMETER,
    THRESHOLD,
    VOLUME,
    VOXELS,
    Segment,
)
from radflow.dicom.equipment import MANUFACTURER, Algorithm
from radflow.dicom.seg import SEGMENTATION_STORAGE, SegmentationMask, complete_headers

COMPREHENSIVE_3D_SR = UID("1.2.840.10008.5.1.4.1.1.88.34")
SERIES_NUMBER = 9902
"""Series Number of Radflow's SR series (next to its SEG series, 9901)."""


@dataclass(frozen=True)
class Finding:
    """A classification result: ``concept`` with ``probability``, flagged at ``threshold``."""

    concept: Code
    probability: float
    threshold: float

    def __post_init__(self) -> None:
        for name in ("probability", "threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} {value} must lie in [0, 1]")

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class SegmentMeasurement:
    """The size of one segment: area (mm² or pixels) or volume (mm³ or voxels)."""

    number: int
    segment: Segment
    name: Code
    value: float
    unit: Code


@dataclass(frozen=True)
class ReportIdentity:
    """UIDs and content time of a report; fixed by the caller so writing it again is the same
    object (same SOP Instance UID) rather than a second one in the PACS."""

    series_instance_uid: str
    sop_instance_uid: str
    content: dt.datetime

    @classmethod
    def new(cls) -> ReportIdentity:
        return cls(generate_uid(), generate_uid(), dt.datetime.now(dt.UTC))


def classification_report(
    sources: Sequence[Dataset],
    finding: Finding,
    algorithm: Algorithm,
    *,
    procedure: Code = IMAGING_PROCEDURE,
    identity: ReportIdentity | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR of a classification over ``sources`` (the scored image's header)."""
    identity = identity or ReportIdentity.new()
    evidence = complete_headers(sources)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(identity, finding.concept.meaning),
        finding_type=finding.concept,
        algorithm_id=algorithm.sr_identification(),
        measurements=[
            hd.sr.Measurement(name=PROBABILITY, value=finding.probability, unit=NO_UNITS),
            hd.sr.Measurement(name=THRESHOLD, value=finding.threshold, unit=NO_UNITS),
        ],
        qualitative_evaluations=[_presence(finding.present)],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup.from_source_image(image) for image in evidence
        ],
    )
    return _report(evidence, [group], algorithm, procedure, identity)


def segment_measurements(
    mask: SegmentationMask, segments: Sequence[Segment]
) -> list[SegmentMeasurement]:
    """Each segment's area (a single frame) or volume (several), from the mask read back."""
    foreground = mask.foreground()
    if foreground.shape[3] != len(segments):
        raise ValueError(
            f"the SEG has {foreground.shape[3]} segment(s) but {len(segments)} are described"
        )
    volume = foreground.shape[0] > 1
    pixel = float(np.prod(mask.pixel_spacing)) if mask.pixel_spacing else None
    if volume:
        size = pixel * mask.slice_spacing if pixel and mask.slice_spacing else None
        name, unit = VOLUME, CUBIC_MILLIMETER if size else VOXELS
    else:
        size = pixel
        name, unit = AREA, SQUARE_MILLIMETER if size else PIXELS
    counts = foreground.reshape(-1, foreground.shape[3]).sum(axis=0)
    return [
        SegmentMeasurement(number, segment, name, float(count) * (size or 1.0), unit)
        for number, (segment, count) in enumerate(zip(segments, counts, strict=True), start=1)
    ]


def empty_measurements(frames: int, segments: Sequence[Segment]) -> list[SegmentMeasurement]:
    """Zero area (one frame) or volume (several) for every segment: a mask without foreground."""
    name, unit = (VOLUME, CUBIC_MILLIMETER) if frames > 1 else (AREA, SQUARE_MILLIMETER)
    return [
        SegmentMeasurement(number, segment, name, 0.0, unit)
        for number, segment in enumerate(segments, start=1)
    ]


def segmentation_report(
    sources: Sequence[Dataset],
    measurements: Sequence[SegmentMeasurement],
    algorithm: Algorithm,
    *,
    segmentation: Dataset | None = None,
    procedure: Code = IMAGING_PROCEDURE,
    identity: ReportIdentity | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR of a segmentation: each segment's size, referencing ``segmentation`` (the SEG)
    for the segments it outlines; ``None`` when the mask was empty and no SEG exists."""
    identity = identity or ReportIdentity.new()
    evidence = complete_headers(sources)
    groups = [
        _segment_group(measurement, algorithm, evidence, segmentation, identity)
        for measurement in measurements
    ]
    if segmentation is not None:
        evidence.append(segmentation)
    return _report(evidence, groups, algorithm, procedure, identity)


_Group = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
)


def _segment_group(
    measurement: SegmentMeasurement,
    algorithm: Algorithm,
    sources: Sequence[Dataset],
    segmentation: Dataset | None,
    identity: ReportIdentity,
) -> _Group:
    segment = measurement.segment
    # The arguments every kind of group takes (highdicom's three group classes share them).
    common: dict[str, Any] = {
        "tracking_identifier": _tracking(identity, f"{measurement.number} {segment.label}"),
        "finding_type": segment.property_type,
        "finding_category": segment.category,
        "algorithm_id": algorithm.sr_identification(),
        "measurements": [
            hd.sr.Measurement(name=measurement.name, value=measurement.value, unit=measurement.unit)
        ],
        "qualitative_evaluations": [_presence(measurement.value > 0)],
    }
    frames = _segment_frames(segmentation, measurement.number) if segmentation else []
    if not frames:  # nothing outlined: no region to point at, the zero says it
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            **common,
            source_images=[
                hd.sr.SourceImageForMeasurementGroup.from_source_image(image) for image in sources
            ],
        )
    assert segmentation is not None
    if measurement.name == VOLUME:
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            **common,
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=SEGMENTATION_STORAGE,
                sop_instance_uid=segmentation.SOPInstanceUID,
                segment_number=measurement.number,
                source_series=hd.sr.SourceSeriesForSegmentation(sources[0].SeriesInstanceUID),
            ),
        )
    reference = hd.sr.ReferencedSegmentationFrame(
        sop_class_uid=SEGMENTATION_STORAGE,
        sop_instance_uid=segmentation.SOPInstanceUID,
        frame_number=frames,
        segment_number=measurement.number,
        source_image=hd.sr.SourceImageForSegmentation.from_source_image(sources[0]),
    )
    # A reference names SEG frames or a segment, not both (PS3.3 C.18.3.1, Referenced Segment
    # Number is conditional on no Referenced Frame Number); highdicom 0.28.2 writes both, which
    # dciodvfy rejects. The frames hold only this segment, so they say it.
    del reference[0].ReferencedSOPSequence[0].ReferencedSegmentNumber
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        **common, referenced_segment=reference
    )


def _segment_frames(segmentation: Dataset, number: int) -> list[int]:
    """The SEG's frame numbers (1-based) that hold segment ``number``."""
    shared = segmentation.SharedFunctionalGroupsSequence[0]
    if "SegmentIdentificationSequence" in shared:  # one segment: every frame is it
        held = int(shared.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        return list(range(1, int(segmentation.NumberOfFrames) + 1)) if held == number else []
    return [
        index
        for index, frame in enumerate(segmentation.PerFrameFunctionalGroupsSequence, start=1)
        if int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == number
    ]


def _presence(present: bool) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(name=PRESENCE, value=PRESENT if present else ABSENT)


def _tracking(identity: ReportIdentity, label: str) -> hd.sr.TrackingIdentifier:
    uid = generate_uid(entropy_srcs=[identity.sop_instance_uid, label])
    return hd.sr.TrackingIdentifier(uid=uid, identifier=label[:64])


def _report(
    evidence: Sequence[Dataset],
    groups: Sequence[_Group],
    algorithm: Algorithm,
    procedure: Code,
    identity: ReportIdentity,
) -> hd.sr.Comprehensive3DSR:
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(DEVICE),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["radflow-model", algorithm.name, algorithm.version]),
            name=algorithm.device[:64],
            manufacturer_name=MANUFACTURER,
            model_name=algorithm.name[:64],
        ),
    )
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure,
        imaging_measurements=list(groups),
    )
    return hd.sr.Comprehensive3DSR(
        evidence=list(evidence),
        content=content,
        series_instance_uid=identity.series_instance_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=f"AI results {algorithm.device}"[:64],
        content_date=identity.content.date(),
        content_time=identity.content.time(),
    )
