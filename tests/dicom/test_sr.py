"""DICOM SR (TID 1500): valid for dciodvfy, and read back with highdicom to the same finding,
probability, threshold, model version and per-segment sizes."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_sources import LESION, VESSELS, ct_series, dciodvfy, radiograph
from factories import dicom_bytes
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from radflow.dicom.codes import ABSENT, PRESENT
from radflow.dicom.equipment import Algorithm
from radflow.dicom.seg import build_segmentation, part10, read_segmentation
from radflow.dicom.sr import (
    Finding,
    classification_report,
    empty_measurements,
    segment_measurements,
    segmentation_report,
)

PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
MODEL = Algorithm.for_model("pneumonia-cxr", 4)


def _valid(report: Dataset, folder: Path) -> hd.sr.Comprehensive3DSR:
    data = part10(report)
    errors, warnings = dciodvfy(data, folder)
    assert errors == []
    assert warnings == []
    return hd.sr.srread(io.BytesIO(data))


def _measurements(group: object) -> dict[str, tuple[float, str]]:
    return {
        m.name.meaning: (float(m.value), m.unit.value)
        for m in group.get_measurements()  # type: ignore[attr-defined]
    }


def _presence(group: object) -> Code:
    [evaluation] = [
        e
        for e in group.get_qualitative_evaluations()  # type: ignore[attr-defined]
        if e.name.meaning == "Presence of property"
    ]
    return evaluation.value


def _algorithm(group: object) -> tuple[str, str]:
    """(name, version) of the group's Algorithm Identification (TID 4019)."""
    root = group[0]  # type: ignore[index]
    name, version = (
        hd.sr.utils.find_content_items(root, name=concept)[0].TextValue
        for concept in (codes.DCM.AlgorithmName, codes.DCM.AlgorithmVersion)
    )
    return name, version


def test_a_classification_report_states_finding_probability_threshold_and_model(
    tmp_path: Path,
) -> None:
    image = radiograph()

    report = classification_report([image], Finding(PNEUMONIA, 0.83, 0.41), MODEL)

    back = _valid(report, tmp_path)
    assert back.StudyInstanceUID == image.StudyInstanceUID and back.Modality == "SR"
    assert back.PatientID == image.PatientID
    [group] = back.content.get_image_measurement_groups()
    assert group.finding_type == PNEUMONIA
    assert _measurements(group) == {"Probability": (0.83, "1"), "Threshold Value": (0.41, "1")}
    assert _presence(group) == PRESENT
    assert _algorithm(group) == ("pneumonia-cxr", "v4")
    [source] = group.source_images
    assert source.referenced_sop_instance_uid == image.SOPInstanceUID
    below = classification_report([image], Finding(PNEUMONIA, 0.2, 0.41), MODEL)
    [group] = hd.sr.srread(io.BytesIO(part10(below))).content.get_image_measurement_groups()
    assert _presence(group) == ABSENT


def test_a_segmentation_report_gives_each_segments_volume_and_references_the_seg(
    tmp_path: Path,
) -> None:
    series = ct_series(slices=4)
    mask = np.zeros((4, 32, 32, 2), bool)
    mask[1:3, 0:10, 0:10, 0] = True  # 200 voxels of 0.7 x 0.7 x 2.5 mm
    seg = build_segmentation(series, mask, [VESSELS, LESION], MODEL)
    measured = segment_measurements(read_segmentation(part10(seg), series), [VESSELS, LESION])

    back = _valid(segmentation_report(series, measured, MODEL, segmentation=seg), tmp_path)

    [vessels] = back.content.get_volumetric_roi_measurement_groups()
    assert vessels.finding_type == VESSELS.property_type
    [(name, (value, unit))] = _measurements(vessels).items()
    assert (name, unit) == ("Volume", "mm3") and value == pytest.approx(200 * 0.7 * 0.7 * 2.5)
    assert vessels.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert _algorithm(vessels) == ("pneumonia-cxr", "v4")
    assert _presence(vessels) == PRESENT
    # The lesion segment outlines nothing: no region to reference, a volume of zero.
    [lesion] = back.content.get_image_measurement_groups()
    assert lesion.finding_type == LESION.property_type
    assert _measurements(lesion) == {"Volume": (0.0, "mm3")}
    assert _presence(lesion) == ABSENT
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in back.CurrentRequestedProcedureEvidenceSequence
        for series_ in study.ReferencedSeriesSequence
        for item in series_.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence and series[0].SOPInstanceUID in evidence


def test_a_report_on_one_image_gives_the_area_in_pixels_without_a_spacing(
    tmp_path: Path,
) -> None:
    image = radiograph()
    del image.PixelSpacing, image.ImagerPixelSpacing
    mask = np.zeros((64, 64), bool)
    mask[:5, :7] = True
    seg = build_segmentation([image], mask, [VESSELS], MODEL)
    measured = segment_measurements(read_segmentation(part10(seg), [image]), [VESSELS])

    back = _valid(segmentation_report([image], measured, MODEL, segmentation=seg), tmp_path)

    [group] = back.content.get_planar_roi_measurement_groups()
    assert _measurements(group) == {"Area": (35.0, "{pixels}")}
    assert group.referenced_segmentation_frame is not None


def test_an_empty_mask_is_reported_as_zero_area_without_a_seg(tmp_path: Path) -> None:
    image = radiograph()

    report = segmentation_report([image], empty_measurements(1, [VESSELS]), MODEL)

    [group] = _valid(report, tmp_path).content.get_image_measurement_groups()
    assert _measurements(group) == {"Area": (0.0, "mm2")}
    assert _presence(group) == ABSENT


def test_images_that_leave_out_type_2_attributes_still_get_a_seg_and_a_report(
    tmp_path: Path,
) -> None:
    # A modality may omit (not just leave empty) Patient's Birth Date, Sex, Study Time, ...;
    # highdicom copies them and failed with an AttributeError.
    image = pydicom.dcmread(io.BytesIO(dicom_bytes()))
    assert "PatientBirthDate" not in image and "StudyTime" not in image
    mask = np.zeros((64, 64), bool)
    mask[1:3, 1:3] = True

    seg = build_segmentation([image], mask, [VESSELS], MODEL)
    report = classification_report([image], Finding(PNEUMONIA, 0.5, 0.5), MODEL)

    for made in (seg, report):
        errors, warnings = dciodvfy(part10(made), tmp_path)
        assert errors == []
        # Justified: the source has no Study Time or Study ID, and they are left empty.
        assert all("needed to build DICOMDIR" in w for w in warnings)
    assert "PatientBirthDate" not in image  # the caller's dataset is left as it was


def test_probabilities_outside_zero_to_one_are_refused() -> None:
    with pytest.raises(ValueError, match=r"probability 1.2 must lie in \[0, 1\]"):
        Finding(PNEUMONIA, 1.2, 0.5)
