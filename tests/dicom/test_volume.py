"""Loading a planned series: Hounsfield units, the affine, and multi-frame enhanced CT."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from radflow.dicom.geometry import Slice, plan_series
from radflow.dicom.instance import read_header
from radflow.dicom.volume import load_volume
from radflow.dicom.writer import CTSeriesBuilder
from radflow.errors import NotAVolume
from radflow.store.local import LocalStore

SPACING = (2.0, 0.8, 0.6)  # between slices, rows, columns (mm)


def _hu(depth: int = 6, rows: int = 5, columns: int = 7) -> np.ndarray:
    """Distinct whole Hounsfield units per voxel: any reordering shows."""
    return (np.arange(depth * rows * columns).reshape(depth, rows, columns) * 3 - 900).astype(
        np.float32
    )


def _builder(orientation: tuple[float, ...], hu: np.ndarray) -> CTSeriesBuilder:
    return CTSeriesBuilder(
        rows=hu.shape[1],
        columns=hu.shape[2],
        spacing=SPACING,
        patient_id="VOL-1",
        patient_name="VOLUME^TEST",
        study_uid=generate_uid(),
        series_uid=generate_uid(),
        orientation=orientation,
        origin=(-50.0, 20.0, 100.0),
    )


def _datasets(orientation: tuple[float, ...], hu: np.ndarray) -> list[pydicom.Dataset]:
    """The volume's slices with Instance Numbers that say nothing about their order."""
    builder = _builder(orientation, hu)
    numbers = np.random.default_rng(0).permutation(len(hu)) + 1
    out = []
    for i, pixels in enumerate(hu):
        ds = builder.slice(i, pixels, sop_instance_uid=generate_uid(), instance_number=numbers[i])
        out.append(pydicom.dcmread(io.BytesIO(_encoded(ds))))  # a copy: slice() reuses one
    return out


def _encoded(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def _stored(tmp_path: Path, datasets: list[pydicom.Dataset]) -> tuple[LocalStore, list[Slice]]:
    """The files in a store, as the index knows them (read_header), in received order."""
    store = LocalStore(tmp_path / "objects")
    slices = []
    for i, ds in enumerate(datasets):
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(_encoded(ds))
        header = read_header(path, 10**8)
        key = f"series/{i}.dcm"
        store.put_bytes(key, path.read_bytes())
        slices.append(
            Slice(
                key,
                header.sha256,
                header.rows,
                header.columns,
                header.frames,
                header.image_type,
                header.image_position,
                header.image_orientation,
                header.pixel_spacing,
                header.temporal_position,
            )
        )
    return store, slices


@pytest.mark.parametrize(
    "orientation",
    [(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (0.0, 0.8, -0.6, 0.0, 0.6, 0.8)],
    ids=["axial", "oblique"],
)
def test_series_loads_in_stack_order_in_hounsfield_units_with_its_affine(
    tmp_path: Path, orientation: tuple[float, ...]
) -> None:
    hu = _hu()
    datasets = _datasets(orientation, hu)
    order = np.random.default_rng(1).permutation(len(datasets))
    store, slices = _stored(tmp_path, [datasets[i] for i in order])

    volume = load_volume(store, plan_series(slices))

    # Down the normal (highdicom's right-handed order), whatever the files' order and numbers.
    np.testing.assert_array_equal(volume.array, hu[::-1])
    builder = _builder(orientation, hu)
    # The affine maps voxel (slice, row, column) to the patient: slice k at its position, a row
    # step along the column direction, a column step along the row direction.
    last = len(hu) - 1
    for k in (0, last):
        np.testing.assert_allclose(
            volume.affine @ [k, 0, 0, 1], [*builder.position(last - k), 1], atol=1e-6
        )
    np.testing.assert_allclose(volume.affine[:3, 2], np.array(orientation[:3]) * SPACING[2])
    np.testing.assert_allclose(volume.affine[:3, 1], np.array(orientation[3:]) * SPACING[1])
    assert volume.window == (40.0, 400.0) and volume.modality == "CT"
    tensor = volume.meta_tensor()
    assert tuple(tensor.shape) == (1, *hu.shape)
    np.testing.assert_allclose(tensor.affine.numpy(), volume.affine)


def test_multiframe_enhanced_ct_through_its_functional_groups(tmp_path: Path) -> None:
    hu = _hu(depth=5)
    datasets = _datasets((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), hu)
    shuffled = [datasets[i] for i in (3, 0, 4, 1, 2)]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=shuffled,
        series_instance_uid=generate_uid(),
        series_number=2,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    store, slices = _stored(tmp_path, [enhanced])
    plan = plan_series(slices)
    assert plan.multiframe

    volume = load_volume(store, plan)

    np.testing.assert_allclose(volume.array, hu[::-1])
    assert volume.axis == "space"
    np.testing.assert_allclose(volume.affine[:3, 0], [0.0, 0.0, -SPACING[0]], atol=1e-6)


def test_multiframe_at_one_position_is_a_time_series_only_for_a_sequence_task(
    tmp_path: Path,
) -> None:
    hu = _hu(depth=4)
    datasets = _datasets((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), hu)
    for ds in datasets:  # a cine: every frame at the first slice's position
        ds.ImagePositionPatient = datasets[0].ImagePositionPatient
    cine = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=datasets,
        series_instance_uid=generate_uid(),
        series_number=3,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    store, slices = _stored(tmp_path, [cine])

    with pytest.raises(NotAVolume, match="not-a-volume"):
        load_volume(store, plan_series(slices))
    frames = load_volume(store, plan_series(slices, time=True))

    assert frames.axis == "time" and frames.array.shape == hu.shape
