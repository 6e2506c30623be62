"""The segmentation kind end to end on synthetic 2D photographs: import, train, score, SEG."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import Label, ModelEvaluation, Prediction, unit_of_work
from radflow.dicom.seg import SEG_KEY, load_sources, read_segmentation
from radflow.ingest.msd import import_segmentation
from radflow.ingest.routing import rules_for
from radflow.learning import tasks
from radflow.learning.evaluation import Pixels, decide_dice, dice_threshold
from radflow.learning.masks import load_mask
from radflow.learning.registry import register
from radflow.learning.scoring import score_stable
from radflow.learning.segmentation import PROBABILITY_KEY, load_probability
from radflow.learning.tasks import SlidingWindow, TrainingPlan
from radflow.learning.training import train_task
from radflow.settings import Settings
from radflow.store import ObjectStore

TASK = "retina-vessels"
SIZE = (72, 88)  # rows, columns: not a multiple of the window, so windows overlap at the edge


def _photograph(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A reddish disc with dark lines (the 'vessels') and their mask."""
    rows, cols = SIZE
    mask = np.zeros(SIZE, dtype=bool)
    for _ in range(4):
        if rng.random() < 0.5:
            r = int(rng.integers(4, rows - 4))
            mask[r : r + 2, :] = True
        else:
            c = int(rng.integers(4, cols - 4))
            mask[:, c : c + 2] = True
    image = np.zeros((*SIZE, 3), dtype=np.float32)
    image[..., 0], image[..., 1], image[..., 2] = 180, 90, 40
    image[mask] *= 0.45
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _dataset(folder: Path, n: int, *, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    fov = np.ones(SIZE, dtype=np.uint8) * 255
    fov[:, :4] = 0  # a field of view: the left edge does not count
    Image.fromarray(fov).save(folder / "fov.png")
    entries = []
    for i in range(n):
        image, mask = _photograph(rng)
        Image.fromarray(image).save(folder / f"{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{i}_mask.png")
        entries.append({"image": f"{i}.png", "label": f"{i}_mask.png", "fov": "fov.png"})
    (folder / "dataset.json").write_text(json.dumps({"name": "synthetic", "training": entries}))
    return folder


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """retina-vessels with a plan of seconds and a 32 px window."""
    task = tasks.get_task(TASK)
    quick = dataclasses.replace(
        task,
        plan=TrainingPlan(
            epochs=4, batch_size=16, learning_rate=1e-2, min_labels=4, patches_per_image=16
        ),
        window=SlidingWindow(roi_size=(32, 32), overlap=0.25, batch_size=16),
    )
    monkeypatch.setitem(tasks.TASKS, TASK, quick)


def test_segmentation_imports_trains_scores_and_writes_seg(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    quick: None,
    tmp_path: Path,
) -> None:
    folder = _dataset(tmp_path / "synthetic", 10)
    report = import_segmentation(settings, session_factory, store, folder, TASK)
    assert (report.studies, report.stored, report.labels) == (10, 10, 10)
    again = import_segmentation(settings, session_factory, store, folder, TASK)
    assert (again.stored, again.duplicates, again.labels) == (0, 10, 0)

    first = train_task(settings, session_factory, store, TASK, progress=False)
    assert str(first.status) == "champion"
    assert first.metrics["dice"] > 0.6, first.metrics
    assert first.metrics["auc"] > 0.9
    assert np.isfinite(first.metrics["hd95"])

    scored = score_stable(
        session_factory, store, TASK, 8, rules=rules_for(settings), cache_dir=settings.cache_dir
    )
    assert (scored.scored, scored.failed) == (10, {})
    with session_factory() as session:
        prediction = session.scalars(select(Prediction).limit(1)).one()
        derived = dict(prediction.derived_keys)
        study_uid = prediction.study.study_uid
        sources = load_sources(store, [prediction.study.series[0].instances[0].object_key])
    probability = load_probability(store, derived[PROBABILITY_KEY])
    assert probability.shape == SIZE
    seg = read_segmentation(store.get_bytes(derived[SEG_KEY]), sources)
    assert seg.array.shape == (1, *SIZE, 1)
    assert np.array_equal(seg.foreground()[0, ..., 0], probability >= first.threshold)
    assert study_uid in derived[SEG_KEY]

    second = train_task(settings, session_factory, store, TASK, progress=False)
    with session_factory() as session:
        decision = session.scalars(
            select(ModelEvaluation).where(ModelEvaluation.model_version_id == second.id)
        ).one()
    # 2 evaluation studies: no Wilcoxon p-value can fall under 0.05, and the reason says so.
    assert "too small for the paired Wilcoxon test" in decision.reason, decision.reason
    assert not decision.promoted and decision.champion_auc is not None


def test_import_refuses_a_mask_of_another_size(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    folder = _dataset(tmp_path / "bad", 1)
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(folder / "0_mask.png")
    with pytest.raises(ValueError, match=r"mask 0_mask\.png is 10x10 but its image is 88x72"):
        import_segmentation(settings, session_factory, store, folder, TASK)


def test_import_reads_nifti_masks_and_refuses_a_photograph_given_as_mask(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    folder = _dataset(tmp_path / "nifti", 1)
    mask = np.asarray(Image.open(folder / "0_mask.png")) > 0
    # As ITK and MONAI write a 2D image: the first axis runs along the columns.
    nifti = nib.Nifti1Image(mask.T.astype(np.uint8), np.eye(4))
    (folder / "0_mask.nii.gz").write_bytes(gzip.compress(nifti.to_bytes()))
    index = json.loads((folder / "dataset.json").read_text())
    index["training"][0]["label"] = "0_mask.nii.gz"
    (folder / "dataset.json").write_text(json.dumps(index))
    report = import_segmentation(settings, session_factory, store, folder, TASK)
    with session_factory() as session:
        value = session.scalars(select(Label.value)).one()
    assert np.array_equal(load_mask(store, report.study_uids[0], TASK, value).mask, mask)

    index["training"][0]["label"] = "0.png"  # the photograph itself
    (folder / "dataset.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"mask 0\.png holds \d+ values"):
        import_segmentation(settings, session_factory, store, folder, TASK)


def test_dice_threshold_and_paired_dice_decision() -> None:
    truth = np.array([True] * 10 + [False] * 90)
    scores = np.where(truth, 0.7, 0.2)
    scores[:2] = 0.3  # two weak positives: a threshold above 0.3 loses them
    assert 0.2 < dice_threshold([Pixels(scores, truth)]) <= 0.3
    better, worse = np.linspace(0.8, 0.9, 12), np.linspace(0.7, 0.8, 12)
    assert decide_dice(better, worse, 0.05).promote
    assert not decide_dice(worse, better, 0.05).promote
    assert not decide_dice(better, better, 0.05).promote
    too_few = decide_dice(better[:4], worse[:4], 0.05)
    assert not too_few.promote and "too small" in too_few.reason
    assert decide_dice(better[:5], worse[:5], 0.05).promote  # p = 1/32


def test_an_empty_mask_writes_no_seg_and_the_study_is_still_scored(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    quick: None,
    tmp_path: Path,
) -> None:
    import_segmentation(settings, session_factory, store, _dataset(tmp_path / "two", 2), TASK)
    task = tasks.get_task(TASK)
    with unit_of_work(session_factory) as session:
        # No pixel reaches a threshold above 1: every mask is empty.
        register(
            session, store, task, task.build_network(), metrics={}, threshold=1.5, training_run=None
        )
    scored = score_stable(session_factory, store, TASK, 8, rules=rules_for(settings))
    assert (scored.scored, scored.failed) == (2, {})
    with session_factory() as session:
        derived = [dict(p.derived_keys) for p in session.scalars(select(Prediction))]
    assert [d.get("seg_error") for d in derived] == ["empty-mask", "empty-mask"]
    assert all(SEG_KEY not in d and PROBABILITY_KEY in d for d in derived)


def test_the_import_command_stores_a_segmentation_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`radflow import segmentation DIR --task retina-vessels`, as an operator types it."""
    from cli.main import main

    for name in ("RADFLOW_DATABASE_URL", "RADFLOW_PSEUDONYM_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RADFLOW_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RADFLOW_STORE_URL", "")
    monkeypatch.setenv("RADFLOW_PSEUDONYM_KEY", "k" * 32)
    folder = _dataset(tmp_path / "drive", 2)
    assert main(["import", "segmentation", str(folder), "--task", TASK]) == 0
    out = capsys.readouterr().out
    assert out.startswith("imported drive:training: 2 studies") and "2 new labels" in out, out
