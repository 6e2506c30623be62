"""The 3D segmentation kind (ct-lesions) end to end on synthetic CT with lesions of known shape:
import (series + NIfTI masks), train, score (label map, multi-frame SEG), report (SR volume), view;
bad masks refused with their reason while nothing stored is lost."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from dicom_sources import dciodvfy
from factories import make_user
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from demo.synthetic_ct import SPACING, mask_nifti, write_lesion_dataset
from radflow.db import (
    Label,
    ModelEvaluation,
    Prediction,
    ResultKind,
    ResultObject,
    Study,
    unit_of_work,
)
from radflow.delivery.reports import write_reports
from radflow.dicom.equipment import Algorithm
from radflow.dicom.seg import SEG_KEY, build_segmentation, load_sources, part10, read_segmentation
from radflow.ingest.msd import import_segmentation
from radflow.ingest.routing import route_studies, rules_for
from radflow.learning import tasks
from radflow.learning.heatmaps import read_label_volume
from radflow.learning.mask_files import MaskError
from radflow.learning.masks import load_mask
from radflow.learning.registry import register
from radflow.learning.scoring import score_stable
from radflow.learning.segmentation import PROBABILITY_KEY, load_predicted_mask
from radflow.learning.tasks import SlidingWindow, TrainingPlan
from radflow.learning.training import train_task
from radflow.services.mask_review import MaskUpload, MaskVerdict, review_mask
from radflow.services.volume_view import label_layer, load_volume_view
from radflow.settings import Settings
from radflow.store import ObjectStore

TASK = "ct-lesions"
SIZE = 24  # voxels along each axis of the synthetic series
STUDIES = 6  # 4 to train on, 2 to evaluate
VOXEL_MM3 = SPACING[0] * SPACING[1] * SPACING[2]
# Where the voxels of a generated (slices, rows, columns) volume lie, as written: feet first.
WRITTEN = np.array(
    [[0, 0, SPACING[2], 0], [0, SPACING[1], 0, 0], [SPACING[0], 0, 0, 0], [0, 0, 0, 1]]
)


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """ct-lesions with a plan of seconds and a 16-voxel window."""
    task = tasks.get_task(TASK)
    quick = dataclasses.replace(
        task,
        spatial_size=(16, 16, 16),
        plan=TrainingPlan(
            epochs=6,
            batch_size=8,
            learning_rate=1e-2,
            min_labels=4,
            val_fraction=0.25,
            patches_per_image=8,
            validate_every=3,
        ),
        window=SlidingWindow(roi_size=(16, 16, 16), overlap=0.25, batch_size=8),
    )
    monkeypatch.setitem(tasks.TASKS, TASK, quick)


def _sources(
    session: Session, store: ObjectStore, settings: Settings, study: Study
) -> tuple[list[object], np.ndarray]:
    """The study's series in stack order (the SEG's source frames) and its affine."""
    plan = route_studies(session, [study.id], tasks.get_task(TASK), rules_for(settings))[
        study.id
    ].plan
    assert plan is not None
    affine = plan.affine()
    assert affine is not None
    return list(load_sources(store, [s.object_key for s in plan.slices])), affine


def _label(session_factory: sessionmaker[Session], study_uid: str) -> str | None:
    with session_factory() as session:
        return session.scalar(
            select(Label.value)
            .join(Study, Study.id == Label.study_id)
            .where(Study.study_uid == study_uid)
            .order_by(Label.id.desc())
            .limit(1)
        )


def test_lesions_import_train_score_seg_sr_and_viewer(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    quick: None,
    tmp_path: Path,
) -> None:
    masks = write_lesion_dataset(tmp_path / "lesions", STUDIES, slices=SIZE, size=SIZE)
    report = import_segmentation(settings, session_factory, store, tmp_path / "lesions", TASK)
    assert (report.studies, report.stored, report.labels) == (STUDIES, STUDIES * SIZE, STUDIES)
    value = _label(session_factory, report.study_uids[0])
    assert value is not None
    truth = load_mask(store, report.study_uids[0], TASK, value).mask
    # The NIfTI (written feet first) turned onto the series as highdicom stacks it: head first.
    assert np.array_equal(truth, masks[0][::-1])

    version = train_task(settings, session_factory, store, TASK, progress=False)
    assert str(version.status) == "champion"
    # Six short epochs: the flows are what is tested; the network has begun to tell lesions.
    assert version.metrics["auc"] > 0.75 and version.metrics["dice"] > 0.0, version.metrics
    assert np.isfinite(version.metrics["hd95"])

    scored = score_stable(
        session_factory, store, TASK, 8, rules=rules_for(settings), cache_dir=settings.cache_dir
    )
    assert (scored.scored, scored.failed) == (STUDIES, {})
    with session_factory() as session:
        predictions = list(session.scalars(select(Prediction).order_by(Prediction.score.desc())))
        with_seg = [p for p in predictions if SEG_KEY in p.derived_keys]
        assert with_seg, [p.derived_keys for p in predictions]
        prediction = with_seg[0]
        derived = dict(prediction.derived_keys)
        study = prediction.study
        sources, affine = _sources(session, store, settings, study)
        view = load_volume_view(session, store, study.series[0].series_uid)
    labels, stored_affine = read_label_volume(store.get_bytes(derived[PROBABILITY_KEY]))
    assert labels.shape == (SIZE, SIZE, SIZE)
    np.testing.assert_allclose(stored_affine, affine)
    mask = load_predicted_mask(store, derived[PROBABILITY_KEY], version.threshold)

    # The multi-frame SEG: valid, one frame per slice that holds the lesion, the same mask back.
    data = store.get_bytes(derived[SEG_KEY])
    errors, warnings = dciodvfy(data, tmp_path)
    assert (errors, warnings) == ([], [])
    seg = read_segmentation(data, sources)  # type: ignore[arg-type]
    assert np.array_equal(seg.foreground()[..., 0], mask)
    assert int(seg_frames(data)) == int(mask.any(axis=(1, 2)).sum())

    # The viewer's label-map layer over the series holds the predicted voxels.
    layer = label_layer(store, derived[PROBABILITY_KEY], view, "Segmentation")
    assert layer.kind == "labels" and layer.shape == view.shape

    run = write_reports(session_factory, store, rules_for(settings))
    assert run.failed == {}
    with session_factory() as session:
        sr_key = session.scalars(
            select(ResultObject.object_key).where(
                ResultObject.prediction_id == prediction.id, ResultObject.kind == ResultKind.SR
            )
        ).one()
    report_sr = hd.sr.srread(io.BytesIO(store.get_bytes(sr_key)))
    [group] = report_sr.content.get_volumetric_roi_measurement_groups()
    [measurement] = group.get_measurements()
    assert (measurement.name.meaning, measurement.unit.value) == ("Volume", "mm3")
    assert float(measurement.value) == pytest.approx(mask.sum() * VOXEL_MM3, rel=1e-4)

    # A challenger is judged on per-study Dice of the same evaluation set, as in 2D (one epoch:
    # the judgement is tested, not the training).
    brief = dataclasses.replace(tasks.get_task(TASK).plan, epochs=1, validate_every=1)
    tasks.TASKS[TASK] = dataclasses.replace(tasks.get_task(TASK), plan=brief)
    second = train_task(settings, session_factory, store, TASK, progress=False)
    with session_factory() as session:
        decision = session.scalars(
            select(ModelEvaluation).where(ModelEvaluation.model_version_id == second.id)
        ).one()
    assert "too small for the paired Wilcoxon test" in decision.reason, decision.reason
    assert not decision.promoted and decision.champion_auc is not None


def seg_frames(data: bytes) -> int:
    import pydicom

    return int(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).NumberOfFrames)


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_a_volume_mask_of_another_size_is_refused_and_nothing_is_lost(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    folder = tmp_path / "lesions"
    masks = write_lesion_dataset(folder, 2, slices=SIZE, size=SIZE)
    good = (folder / "case000.nii.gz").read_bytes()
    (folder / "case000.nii.gz").write_bytes(mask_nifti(masks[0][:16], WRITTEN))
    with pytest.raises(MaskError, match=r"is 16x24x24 but its volume is 24x24x24") as refused:
        import_segmentation(settings, session_factory, store, folder, TASK)
    assert refused.value.reason == "mask-size"
    with session_factory() as session:
        assert session.scalar(select(Label.id).limit(1)) is None  # no label from a half import
    (folder / "case000.nii.gz").write_bytes(good)
    again = import_segmentation(settings, session_factory, store, folder, TASK)
    # The series were kept: the second import stores nothing again and adds the labels.
    assert (again.stored, again.duplicates, again.labels) == (0, 2 * SIZE, 2)


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_review_takes_a_corrected_nifti_or_seg_of_a_volume_and_refuses_bad_ones(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    masks = write_lesion_dataset(tmp_path / "lesions", 1, slices=SIZE, size=SIZE)
    report = import_segmentation(settings, session_factory, store, tmp_path / "lesions", TASK)
    uid = report.study_uids[0]
    imported = _label(session_factory, uid)
    with unit_of_work(session_factory) as session:
        rita = make_user(session, "rita")

    def review(name: str, data: bytes) -> int | None:
        with unit_of_work(session_factory) as session:
            return review_mask(
                session,
                store,
                settings,
                rita,
                uid,
                TASK,
                MaskVerdict.CORRECT,
                upload=MaskUpload(name, data),
            ).foreground

    small = mask_nifti(masks[0][:, :16], WRITTEN)
    with pytest.raises(MaskError, match="is 24x16x24 but its volume is 24x24x24"):
        review("small.nii.gz", small)
    empty = mask_nifti(np.zeros_like(masks[0]), WRITTEN)
    with pytest.raises(MaskError, match="no pixel of lesion") as refused:
        review("empty.nii.gz", empty)
    assert refused.value.reason == "empty-mask"
    assert _label(session_factory, uid) == imported  # nothing changed

    corrected = masks[0].copy()
    holding = np.flatnonzero(corrected.any(axis=(1, 2)))
    corrected[holding[: len(holding) // 2]] = False  # the reviewer removes half the slices
    assert review("fixed.nii.gz", mask_nifti(corrected, WRITTEN)) == corrected.sum()
    value = _label(session_factory, uid)
    assert value is not None and value != imported
    assert np.array_equal(load_mask(store, uid, TASK, value).mask, corrected[::-1])

    with session_factory() as session:
        study = session.scalars(select(Study).where(Study.study_uid == uid)).one()
        sources, _ = _sources(session, store, settings, study)
    stacked = masks[0][::-1]  # in stack order, as the SEG's source frames are given
    seg = build_segmentation(
        sources,  # type: ignore[arg-type]
        stacked,
        tasks.get_task(TASK).coding.segments,
        Algorithm.for_model(TASK, 1),
    )
    assert review("seg.dcm", part10(seg)) == stacked.sum()
    value = _label(session_factory, uid)
    assert value is not None
    assert np.array_equal(load_mask(store, uid, TASK, value).mask, stacked)


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_an_empty_volume_mask_writes_no_seg_and_the_sr_says_zero_volume(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    quick: None,
    tmp_path: Path,
) -> None:
    write_lesion_dataset(tmp_path / "lesions", 1, slices=SIZE, size=SIZE)
    import_segmentation(
        settings, session_factory, store, tmp_path / "lesions", TASK, unlabeled=True
    )
    task = tasks.get_task(TASK)
    with unit_of_work(session_factory) as session:
        # No voxel reaches a threshold above 1: the mask is empty.
        register(
            session, store, task, task.build_network(), metrics={}, threshold=1.5, training_run=None
        )
    scored = score_stable(session_factory, store, TASK, 8, rules=rules_for(settings))
    assert (scored.scored, scored.failed) == (1, {})
    with session_factory() as session:
        prediction = session.scalars(select(Prediction)).one()
        derived, prediction_id = dict(prediction.derived_keys), prediction.id
    assert derived.get("seg_error") == "empty-mask" and SEG_KEY not in derived
    labels, _ = read_label_volume(store.get_bytes(derived[PROBABILITY_KEY]))
    assert labels.shape == (SIZE, SIZE, SIZE) and not labels.any()

    assert write_reports(session_factory, store, rules_for(settings)).failed == {}
    with session_factory() as session:
        sr_key = session.scalars(
            select(ResultObject.object_key).where(ResultObject.prediction_id == prediction_id)
        ).one()
    report = hd.sr.srread(io.BytesIO(store.get_bytes(sr_key)))
    [group] = report.content.get_image_measurement_groups()
    [measurement] = group.get_measurements()
    assert (measurement.name.meaning, float(measurement.value)) == ("Volume", 0.0)

    # Accepting the (empty) predicted mask of the volume needs the reviewer's confirmation.
    with unit_of_work(session_factory) as session:
        rita = make_user(session, "rita")
        uid = session.scalars(select(Study.study_uid)).one()
    with pytest.raises(MaskError, match="no pixel of lesion"), unit_of_work(session_factory) as s:
        review_mask(s, store, settings, rita, uid, TASK, MaskVerdict.ACCEPT)
    with unit_of_work(session_factory) as session:
        review_mask(session, store, settings, rita, uid, TASK, "accept", confirm_empty=True)
    value = _label(session_factory, uid)
    assert value is not None
    accepted = load_mask(store, uid, TASK, value).mask
    assert accepted.shape == (SIZE, SIZE, SIZE) and not accepted.any()


def test_the_lesion_dataset_names_each_case_and_its_mask(tmp_path: Path) -> None:
    masks = write_lesion_dataset(tmp_path, 2, slices=12, size=24, seed=3)
    index = json.loads((tmp_path / "dataset.json").read_text())
    assert [e["label"] for e in index["training"]] == ["case000.nii.gz", "case001.nii.gz"]
    assert len(list((tmp_path / "case000").iterdir())) == 12
    assert all(m.shape == (12, 24, 24) and m.any() for m in masks)
