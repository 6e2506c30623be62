"""DICOM SEG: valid for dciodvfy on every kind of source, read back to the same mask, and
clear reasons for masks and SEGs that cannot be used."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_sources import (
    LESION,
    OPHTHALMIC_PHOTOGRAPHY_8_BIT,
    VESSELS,
    ct_series,
    dciodvfy,
    enhanced_ct,
    multiframe_capture,
    photograph,
    radiograph,
)

from radflow.dicom.equipment import Algorithm
from radflow.dicom.seg import (
    SegmentationError,
    build_segmentation,
    load_sources,
    part10,
    read_segmentation,
    write_segmentation,
)
from radflow.store import ObjectStore

MODEL = Algorithm.for_model("retina-vessels", 3)


def _valid(data: bytes, folder: Path) -> None:
    errors, warnings = dciodvfy(data, folder)
    assert errors == []
    assert warnings == []


def test_a_binary_seg_over_a_radiograph_is_valid_and_reads_back(tmp_path: Path) -> None:
    source = radiograph()
    mask = np.zeros((64, 64), bool)
    mask[10:20, 5:40] = True

    seg = build_segmentation([source], mask, [VESSELS], MODEL)
    data = part10(seg)

    _valid(data, tmp_path)
    written = pydicom.dcmread(io.BytesIO(data))
    assert written.StudyInstanceUID == source.StudyInstanceUID
    assert written.PatientID == source.PatientID  # the PACS files it with the patient
    algorithm = written.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("retina-vessels", "v3")
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    assert written.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "59820001"

    back = read_segmentation(data, [source])
    assert back.labels == ("vessels",) and not back.fractional
    assert np.array_equal(back.array[0, ..., 0], mask)
    assert back.pixel_spacing is not None


def test_a_seg_over_a_colour_photograph_is_valid_and_reads_back(tmp_path: Path) -> None:
    source = photograph()
    mask = np.zeros((40, 50), bool)
    mask[5:9, 10:30] = True

    data = part10(build_segmentation([source], mask, [VESSELS], MODEL))

    errors, _ = dciodvfy(data, tmp_path)  # warnings: the photograph's own empty type 2 values
    assert errors == []
    assert np.array_equal(read_segmentation(data, [source]).array[0, ..., 0], mask)


def test_a_source_highdicom_cannot_derive_from_is_refused_with_a_reason() -> None:
    # highdicom 0.28.2 takes Ophthalmic Photography (a multi-frame IOD) for an enhanced image
    # and asks for functional groups it does not have; the AttributeError becomes a reason.
    source = photograph(OPHTHALMIC_PHOTOGRAPHY_8_BIT)
    source.NumberOfFrames = 1
    with pytest.raises(SegmentationError) as refused:
        build_segmentation([source], np.ones((40, 50), bool), [VESSELS], MODEL)
    assert refused.value.reason == "invalid-segmentation"
    assert "check the source images" in str(refused.value)


def test_a_multi_segment_seg_over_a_ct_series_reads_back_per_slice(tmp_path: Path) -> None:
    series = ct_series(slices=4)
    mask = np.zeros((4, 32, 32, 2), bool)
    mask[1:3, 5:10, 5:12, 0] = True
    mask[2, 20:25, 20:30, 1] = True

    data = part10(build_segmentation(series, mask, [VESSELS, LESION], MODEL))

    _valid(data, tmp_path)
    back = read_segmentation(data, series)
    assert np.array_equal(back.array, mask)
    assert back.pixel_spacing == (0.7, 0.7) and back.slice_spacing == 2.5
    # Given in another order, the slices come back in that order.
    reversed_back = read_segmentation(data, series[::-1])
    assert np.array_equal(reversed_back.array, mask[::-1])


def test_a_label_map_gives_one_segment_per_label(tmp_path: Path) -> None:
    series = ct_series(slices=2)
    labels = np.zeros((2, 32, 32), np.int64)  # an argmax over background, vessels, lesion
    labels[0, 2:6, 2:6] = 1
    labels[1, 10:20, 10:12] = 2

    data = part10(build_segmentation(series, labels, [VESSELS, LESION], MODEL))

    back = read_segmentation(data, series)
    assert np.array_equal(back.array, np.stack([labels == 1, labels == 2], axis=-1))
    with pytest.raises(SegmentationError, match=r"holds 0 \(background\) to 2, not 0 to 3"):
        build_segmentation(series, labels + (labels > 1), [VESSELS, LESION], MODEL)


def test_a_fractional_seg_keeps_probabilities_to_one_part_in_255(tmp_path: Path) -> None:
    series = ct_series(slices=3)
    probabilities = np.zeros((3, 32, 32), np.float32)
    probabilities[1, 4:12, 4:12] = np.linspace(0.1, 1.0, 64, dtype=np.float32).reshape(8, 8)

    data = part10(build_segmentation(series, probabilities, [LESION], MODEL, fractional=True))

    _valid(data, tmp_path)
    back = read_segmentation(data, series)
    assert back.fractional
    assert np.abs(back.array[..., 0] - probabilities).max() <= 1 / 255 + 1e-6


def test_a_seg_over_a_multi_frame_image_reads_back_per_frame(tmp_path: Path) -> None:
    source = enhanced_ct(slices=3)
    mask = np.zeros((3, 32, 32), bool)
    mask[0, :4, :4] = mask[2, 10:20, 10:12] = True

    data = part10(build_segmentation([source], mask, [LESION], MODEL))

    errors, _ = dciodvfy(data, tmp_path)
    assert errors == []
    assert np.array_equal(read_segmentation(data, [source]).array[..., 0], mask)


@pytest.mark.parametrize(
    ("mask", "segments", "reason", "says"),
    [
        (np.ones((32, 64), bool), [VESSELS], "mask-shape", "resample the mask"),
        (np.ones((2, 64, 64), bool), [VESSELS], "mask-shape", "(1, 64, 64)"),
        (np.ones((1, 64, 64, 2), bool), [VESSELS], "segment-count", "one segment per channel"),
        (np.zeros((64, 64), bool), [VESSELS], "empty-mask", "SR reports an area of zero"),
        (np.full((64, 64), 0.6), [VESSELS], "mask-values", "fractional=True"),
        (np.full((64, 64), 2.0), [VESSELS], "mask-values", "[0, 1]"),
        (np.full((64, 64), np.nan), [VESSELS], "mask-values", "NaN"),
        (np.ones((64, 64), bool), [], "segment-count", "at least one segment"),
    ],
)
def test_a_mask_that_does_not_fit_its_image_is_refused_with_its_reason(
    mask: np.ndarray, segments: list[object], reason: str, says: str
) -> None:
    with pytest.raises(SegmentationError) as refused:
        build_segmentation([radiograph()], mask, segments, MODEL)  # type: ignore[arg-type]
    assert refused.value.reason == reason
    assert says in str(refused.value)


def test_frames_without_a_frame_of_reference_are_refused_as_sources() -> None:
    # Nothing places them in one volume; highdicom, given the capture, wrote one frame of three.
    first = radiograph()
    pair = [first, radiograph(study_uid=first.StudyInstanceUID)]
    for sources, shape in (([multiframe_capture(frames=3)], (3, 32, 32)), (pair, (2, 64, 64))):
        with pytest.raises(SegmentationError) as refused:
            build_segmentation(sources, np.ones(shape, bool), [LESION], MODEL)
        assert refused.value.reason == "sources"
        assert "write one per image" in str(refused.value)


def test_a_seg_of_other_images_is_refused_as_unknown_instances() -> None:
    ours, theirs = radiograph(), radiograph()
    mask = np.ones((64, 64), bool)
    data = part10(build_segmentation([theirs], mask, [VESSELS], MODEL))

    with pytest.raises(SegmentationError) as refused:
        read_segmentation(data, [ours])
    assert refused.value.reason == "unknown-instances"
    assert str(theirs.SOPInstanceUID) in str(refused.value)
    assert "make the SEG from this study's images" in str(refused.value)


def test_an_image_is_not_read_as_a_segmentation() -> None:
    source = radiograph()
    for data, says in ((part10(source), "Digital X-Ray"), (b"not dicom", "not a readable")):
        with pytest.raises(SegmentationError) as refused:
            read_segmentation(data, [source])
        assert refused.value.reason == "not-a-segmentation"
        assert says in str(refused.value)


def test_written_segs_are_derived_objects_that_read_back_from_the_store(
    store: ObjectStore,
) -> None:
    series = ct_series(slices=2)
    for ds in series:
        store.put_bytes(f"sources/{ds.SOPInstanceUID}.dcm", part10(ds))
    sources = load_sources(store, [f"sources/{ds.SOPInstanceUID}.dcm" for ds in series])
    assert "PixelData" not in sources[0]  # headers are enough
    mask = np.zeros((2, 32, 32), bool)
    mask[1, 3:9, 3:9] = True

    stored = write_segmentation(store, sources, mask, [LESION], MODEL, task="ct-lesions", version=2)

    study = series[0].StudyInstanceUID
    assert stored.key == f"derived/{study}/ct-lesions/v2/seg.{stored.sop_instance_uid}.dcm"
    back = read_segmentation(store.get_bytes(stored.key), sources)
    assert np.array_equal(back.array[..., 0], mask)
    assert pydicom.dcmread(io.BytesIO(store.get_bytes(stored.key))).Modality == "SEG"
