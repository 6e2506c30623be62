"""A series packed for the browser viewer: turned to (feet, posterior, left), values kept, windows
that fit the modality, and maps laid over it where they lie in the patient."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from dicom_sources import ct_series, ingest
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import Series, Study
from radflow.errors import NotAVolume
from radflow.learning.heatmaps import heatmap_volume, label_volume
from radflow.services.volume_view import (
    AUTO,
    FROM_THE_IMAGE,
    VolumeView,
    heat_layer,
    label_layer,
    load_preview,
    load_volume_view,
    window_presets,
)
from radflow.settings import Settings
from radflow.store import ObjectStore

SLICES, SIZE = 5, 8


def volume(slices: int = SLICES, modality: str = "CT", rescale: float = 1.0) -> list[Dataset]:
    """Axial slices 2.5 mm apart (slice i at z = 2.5 i, toward the head), 0.7 mm pixels; pixel
    (i, r, c) stores 100 i + 10 r + c."""
    series = ct_series(slices, SIZE)
    r, c = np.mgrid[0:SIZE, 0:SIZE]
    for i, ds in enumerate(series):
        ds.Modality = modality
        ds.RescaleSlope, ds.RescaleIntercept = rescale, -1024
        ds.PixelData = (100 * i + 10 * r + c).astype(np.int16).tobytes()
    return series


def packed(
    datasets: list[Dataset],
    tmp_path: Path,
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
) -> VolumeView:
    study_uid = ingest(datasets, tmp_path / "in", settings, session_factory, store)
    with session_factory() as session:
        series_uid = session.scalars(
            select(Series.series_uid).join(Study).where(Study.study_uid == study_uid)
        ).one()
        return load_volume_view(session, store, series_uid)


def slices(view: VolumeView) -> np.ndarray:
    """The packed voxels back in modality units, as the browser reads them: each slice's low
    bytes, then its high bytes."""
    starts = (0, *view.ends[:-1])
    planes = [
        np.frombuffer(zlib.decompress(view.data[a:b]), np.uint8).reshape(2, -1)
        for a, b in zip(starts, view.ends, strict=True)
    ]
    values = [(p[0] | p[1].astype(np.uint16) << 8).view(np.int16) for p in planes]
    return np.stack([v.reshape(view.shape[1:]) for v in values]) * view.slope + view.intercept


def test_an_axial_ct_is_sent_head_first_in_hounsfield_units_with_ct_windows(
    tmp_path: Path,
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
) -> None:
    view = packed(volume(), tmp_path, settings, session_factory, store)
    assert (view.shape, view.acquired) == ((SLICES, SIZE, SIZE), "axial")
    assert view.spacing == pytest.approx((2.5, 0.7, 0.7))
    assert (view.slope, view.intercept) == (1.0, 0.0)  # integral HU go as they are
    r, c = np.mgrid[0:SIZE, 0:SIZE]
    # The slice nearest the head (the last acquired) comes first; rows run to the back and
    # columns to the patient's left, as stored.
    expected = np.stack([100 * i + 10 * r + c - 1024 for i in reversed(range(SLICES))])
    np.testing.assert_array_equal(slices(view), expected)
    assert list(view.windows) == [FROM_THE_IMAGE, "Lung", "Mediastinum", "Bone", "Brain", "Abdomen"]


def test_the_preview_is_the_slice_the_viewer_opens_on(
    tmp_path: Path,
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
) -> None:
    whole = packed(volume(), tmp_path, settings, session_factory, store)
    with session_factory() as session:
        preview = load_preview(session, store, whole.series_uid)
    assert preview is not None
    assert (preview.first, preview.shape, preview.acquired) == (SLICES // 2, whole.shape, "axial")
    assert preview.spacing == pytest.approx(whole.spacing)
    np.testing.assert_allclose(preview.affine, whole.affine)
    assert list(preview.windows) == list(whole.windows)
    (alone,) = slices(preview)
    np.testing.assert_array_equal(alone, slices(whole)[SLICES // 2])


def test_an_mr_gets_no_ct_presets_and_fractional_values_survive_scaling(
    tmp_path: Path,
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
) -> None:
    datasets = volume(modality="MR", rescale=0.25)
    for ds in datasets:
        ds.WindowCenter, ds.WindowWidth = 40, 400
    view = packed(datasets, tmp_path, settings, session_factory, store)
    assert list(view.windows) == [FROM_THE_IMAGE, AUTO]
    assert view.windows[FROM_THE_IMAGE] == (40.0, 400.0)
    assert view.slope != 1.0
    r, c = np.mgrid[0:SIZE, 0:SIZE]
    expected = np.stack([(100 * i + 10 * r + c) * 0.25 - 1024 for i in reversed(range(SLICES))])
    np.testing.assert_allclose(slices(view), expected, atol=view.slope)
    assert window_presets("MR") == [FROM_THE_IMAGE]
    assert "Lung" in window_presets("ct")


def test_a_series_that_is_no_volume_says_why(
    tmp_path: Path,
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
) -> None:
    with pytest.raises(NotAVolume, match="too-few-slices"):
        packed(volume(slices=2), tmp_path, settings, session_factory, store)


def test_maps_are_laid_where_they_lie_in_the_patient(
    tmp_path: Path,
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
) -> None:
    """A heat map and a label map on the series' own grid (as acquired: slice 0 nearest the
    feet), hot / labelled in the first acquired slice only, land in the last slice sent."""
    view = packed(volume(), tmp_path, settings, session_factory, store)
    acquired = view.affine.copy()  # the sent grid, flipped back along the slices
    acquired[:3, 0] *= -1
    acquired[:3, 3] = view.affine[:3, 3] + view.affine[:3, 0] * (SLICES - 1)
    hot = np.zeros((SLICES, SIZE, SIZE))
    hot[0, 2:4, 5:7] = 1.0
    store.put_bytes("derived/heat.npz", heatmap_volume(hot, acquired))
    store.put_bytes("derived/labels.npz", label_volume((hot * 3).astype(np.uint8), acquired))

    heat = heat_layer(store, "derived/heat.npz", view, "Grad-CAM")
    labels = label_layer(store, "derived/labels.npz", view, "Mask")
    for layer, value in ((heat, 255), (labels, 3)):
        assert (layer.shape, layer.factors) == ((SLICES, SIZE, SIZE), (1, 1, 1))
        values = np.frombuffer(zlib.decompress(layer.data), np.uint8).reshape(layer.shape)
        assert values[-1, 2:4, 5:7].min() == value
        assert values.sum() == 4 * value
