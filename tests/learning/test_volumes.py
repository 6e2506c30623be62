"""Tasks on volumes end to end, on both backends: a 3D npz imported as CT series, both kinds
trained, promoted and scored with Grad-CAM volumes; a series that is not one volume says why."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import Instance, ModelStatus, Prediction, Study, StudyStatus
from radflow.dicom.geometry import plan_series
from radflow.dicom.volume import load_volume
from radflow.ingest.importers import VOLUME_SPACING_MM, import_npz
from radflow.ingest.routing import series_slices
from radflow.learning import tasks
from radflow.learning.heatmaps import heatmap_volume, read_heatmap_volume
from radflow.learning.scoring import score_stable
from radflow.learning.tasks import TrainingPlan
from radflow.learning.training import train_task
from radflow.services.study_view import (
    InstanceRef,
    OverlayUnreadable,
    get_study_view,
    load_overlay,
)
from radflow.settings import Settings
from radflow.store import ObjectStore
from radflow.store.local import LocalStore

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SIZE = 8  # voxels along each axis: the tasks resize to 28^3, tests keep the files small


def _volumes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise, with a bright blob in the positive half (label 1)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.uint8)
    images = rng.integers(0, 90, (n, SIZE, SIZE, SIZE)).astype(np.uint8)
    images[labels == 1, 2:6, 2:6, 2:6] = 230
    return images, labels.reshape(-1, 1)


def _npz(path: Path) -> Path:
    train, train_labels = _volumes(12, seed=1)
    val, val_labels = _volumes(8, seed=2)
    np.savez(
        path, train_images=train, train_labels=train_labels, val_images=val, val_labels=val_labels
    )
    return path


@pytest.fixture
def quick_volume_tasks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Both volume tasks with a one-epoch plan: the flows are what is tested, not accuracy."""
    names = ["adrenal-ct-3d", "adrenal-ct-seq"]
    for name in names:
        quick = dataclasses.replace(
            tasks.get_task(name), plan=TrainingPlan(epochs=1, batch_size=8, min_labels=8)
        )
        monkeypatch.setitem(tasks.TASKS, name, quick)
    return names


def test_volumes_import_train_score_and_explain(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    tmp_path: Path,
    quick_volume_tasks: list[str],
) -> None:
    path = _npz(tmp_path / "volumes.npz")
    first, second = quick_volume_tasks

    report = import_npz(settings, session_factory, store, path, first)
    again = import_npz(settings, session_factory, store, path, second)

    assert (report.studies, report.stored, report.labels) == (20, 20 * SIZE, 20)
    assert (again.stored, again.duplicates, again.labels) == (0, 20 * SIZE, 20)
    with session_factory() as session:
        series_id = session.scalars(select(Instance.series_id).limit(1)).one()
        plan = plan_series(series_slices(session, [series_id])[series_id])
    volume = load_volume(store, plan)
    assert volume.array.shape == (SIZE, SIZE, SIZE)
    assert plan.spacing == pytest.approx(VOLUME_SPACING_MM)
    # 8-bit values spread over the abdominal window (-160..240 HU): 0 -> -160.
    assert float(volume.array.min()) >= -160.0 and float(volume.array.max()) <= 240.0

    for name in quick_volume_tasks:
        version = train_task(settings, session_factory, store, name, progress=False)
        assert version.status == ModelStatus.CHAMPION
        scored = score_stable(
            session_factory, store, name, 8, explain=True, cache_dir=settings.cache_dir
        )
        assert (scored.scored, scored.failed) == (20, {})
        with session_factory() as session:
            prediction = session.scalars(
                select(Prediction)
                .where(Prediction.model_version_id == version.id)
                .order_by(Prediction.score.desc())  # a blob: a map with something on it
                .limit(1)
            ).one()
            view = get_study_view(session, prediction.study.study_uid)
        key = prediction.derived_keys["gradcam"]
        heat, _ = read_heatmap_volume(store.get_bytes(key))
        assert heat.shape == (28, 28, 28) and 0.0 <= heat.min() <= heat.max() <= 1.0
        # Shown slice by slice on the series, through its affine: the 28^3 map placed back on
        # the 8 slices of 8x8 is the map shrunk to them.
        shown = np.stack(
            [load_overlay(store, key, (SIZE, SIZE), i) for i in view.series[0].instances]
        )
        # The series' slices go up (Instance Numbers, as imported); the 3D task's map is turned
        # so too (Orientation SPL), the sequence task's is in highdicom's order (down).
        shrunk = _shrink(heat if name == "adrenal-ct-3d" else heat[::-1])
        assert np.corrcoef(shown.ravel(), shrunk.ravel())[0, 1] > 0.9, name


def _shrink(heat: np.ndarray) -> np.ndarray:
    """A 28^3 map at the 8^3 of the series (area averaging)."""
    import torch

    return torch.nn.functional.interpolate(
        torch.from_numpy(heat.copy())[None, None], size=(SIZE,) * 3, mode="area"
    )[0, 0].numpy()


def test_a_heat_map_volume_is_sampled_where_it_crosses_the_shown_slice(tmp_path: Path) -> None:
    heat = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    # Voxel (slice, row, column) -> LPS mm: slices 3 mm apart going down, rows 0.5 mm back,
    # columns 0.25 mm to the left, from (10, 20, 30).
    affine = np.array(
        [[0, 0, 0.25, 10], [0, 0.5, 0, 20], [-3.0, 0, 0, 30], [0, 0, 0, 1]], dtype=np.float64
    )
    store = LocalStore(tmp_path)
    store.put_bytes("map.npz", heatmap_volume(heat, affine))
    instance = InstanceRef(
        "slice", 1, position=(10.0, 20.0, 24.0), orientation=AXIAL, pixel_spacing=(0.5, 0.25)
    )

    shown = load_overlay(store, "map.npz", (5, 6), instance)

    np.testing.assert_allclose(shown, heat[2], atol=1 / 255)
    beside = dataclasses.replace(instance, position=(10.0, 20.0, 100.0))
    assert load_overlay(store, "map.npz", (5, 6), beside).max() == 0.0
    with pytest.raises(OverlayUnreadable, match="no indexed geometry"):
        load_overlay(store, "map.npz", (5, 6), dataclasses.replace(instance, position=None))


def _ct_series(tmp_path: Path, skip: int | None) -> list[Path]:
    """An abdominal CT series of 6 slices written as files, slice ``skip`` left out."""
    from radflow.dicom.writer import CTSeriesBuilder

    builder = CTSeriesBuilder(
        rows=8,
        columns=8,
        spacing=(2.0, 1.0, 1.0),
        patient_id="CT-GAP",
        patient_name="GAP^CT",
        study_uid=generate_uid(),
        series_uid=generate_uid(),
    )
    paths = []
    for i in range(6):
        if i == skip:
            continue
        ds = builder.slice(i, np.full((8, 8), 40.0), sop_instance_uid=generate_uid())
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_a_series_with_a_missing_slice_shows_why_no_model_applies(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    tmp_path: Path,
    quick_volume_tasks: list[str],
) -> None:
    from radflow import ingest
    from radflow.dicom.instance import read_header

    path = _npz(tmp_path / "volumes.npz")
    import_npz(settings, session_factory, store, path, quick_volume_tasks[0])
    train_task(settings, session_factory, store, quick_volume_tasks[0], progress=False)
    files = _ct_series(tmp_path, skip=3)
    headers = [(p, read_header(p, settings.max_pixels)) for p in files]
    ingest.ingest_batch(headers, settings=settings, session_factory=session_factory, store=store)
    study_uid = headers[0][1].study_uid
    with session_factory.begin() as session:
        ingest.mark_stable(session, [study_uid])

    report = score_stable(session_factory, store, quick_volume_tasks[0], 8)

    assert report.no_model == 1
    with session_factory() as session:
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        assert study.status == StudyStatus.NO_MODEL
        assert "missing-slices" in (study.status_reason or "")
        reasons = get_study_view(session, study_uid).not_scored
    assert set(reasons) == {quick_volume_tasks[0]}
    assert reasons[quick_volume_tasks[0]].startswith(
        f"no series for {quick_volume_tasks[0]} (series 1: missing-slices: about 1 slice(s) missing"
    )
