"""`radflow import npz`: MedMNIST arrays -> DICOM studies through ingest, with labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import Instance, Label, Patient, Study, StudyStatus
from radflow.dicom import writer
from radflow.dicom.pixels import to_array
from radflow.ingest import importers
from radflow.ingest.importers import import_npz
from radflow.settings import Settings
from radflow.store import ObjectStore

TASK = "pneumonia-cxr"


def _npz(path: Path, n_train: int = 6, n_val: int = 4) -> Path:
    rng = np.random.default_rng(0)
    np.savez(
        path,
        train_images=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        train_labels=(np.arange(n_train) % 2).reshape(-1, 1).astype(np.uint8),
        val_images=rng.integers(0, 256, (n_val, 28, 28), dtype=np.uint8),
        val_labels=np.ones((n_val, 1), dtype=np.uint8),
    )
    return path


def _count(session: Session, model: type) -> int:
    return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_import_makes_one_labelled_study_per_image_and_is_idempotent(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    tmp_path: Path,
) -> None:
    path = _npz(tmp_path / "mini.npz")

    report = import_npz(settings, session_factory, store, path, TASK, splits=["train", "val"])

    assert (report.studies, report.stored, report.labels) == (10, 10, 10)
    assert report.by_split == {"train": 6, "val": 4}
    with session_factory() as session:
        assert _count(session, Study) == _count(session, Patient) == 10
        labels = session.scalars(select(Label).order_by(Label.id)).all()
        assert {(lb.source, lb.task) for lb in labels} == {("import", TASK)}
        assert [lb.split for lb in labels] == ["train"] * 6 + ["val"] * 4
        assert [lb.value for lb in labels[:6]] == ["normal", "pneumonia"] * 3
        assert set(session.scalars(select(Study.status))) == {StudyStatus.STABLE}
        # 28 px sources are stored at 64 px (routing refuses images under 32 px), as 12-bit
        # values: 8-bit x16, bicubic in between; shrunk back they match the source closely.
        first = session.scalars(select(Instance).order_by(Instance.id)).first()
        assert first is not None and first.rows == first.columns == 64
        stored = to_array(store.get_bytes(first.object_key))
        with np.load(path) as data:
            source = data["train_images"][0].astype(np.float32) * 16
        back = torch.nn.functional.interpolate(
            torch.from_numpy(stored)[None, None].float(), size=(28, 28), mode="area"
        )[0, 0].numpy()
        assert np.corrcoef(back.ravel(), source.ravel())[0, 1] > 0.8

    again = import_npz(settings, session_factory, store, path, TASK, splits=["train", "val"])
    assert (again.stored, again.duplicates, again.labels) == (0, 10, 0)
    with session_factory() as session:
        assert (_count(session, Study), _count(session, Label)) == (10, 10)


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_unlabeled_import_adds_studies_only(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    tmp_path: Path,
) -> None:
    path = _npz(tmp_path / "mini.npz")
    report = import_npz(
        settings, session_factory, store, path, TASK, splits=["val"], unlabeled=True
    )
    assert (report.studies, report.labels) == (4, 0)
    with session_factory() as session:
        assert (_count(session, Study), _count(session, Label)) == (4, 0)


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_unknown_split_names_the_available_ones(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    tmp_path: Path,
) -> None:
    path = _npz(tmp_path / "mini.npz")
    with pytest.raises(ValueError, match=r"no split\(s\) \['test'\].*\['train', 'val'\]"):
        import_npz(settings, session_factory, store, path, TASK, splits=["test"])


def test_importing_again_after_a_pydicom_upgrade_adds_nothing(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = _npz(tmp_path / "mini.npz")
    import_npz(settings, session_factory, store, path, TASK, splits=["val"])
    # Every pydicom release has its own implementation UID, written in each file's meta: the
    # same images come out in other bytes.
    monkeypatch.setattr(writer, "PYDICOM_IMPLEMENTATION_UID", generate_uid())

    again = import_npz(settings, session_factory, store, path, TASK, splits=["val"])

    assert (again.stored, again.duplicates, again.labels) == (0, 4, 0)
    with session_factory() as session:
        assert (_count(session, Instance), _count(session, Label)) == (4, 4)


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_images_refused_by_ingest_stop_the_import_with_the_reason(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = _npz(tmp_path / "mini.npz")
    import_npz(settings, session_factory, store, path, TASK, splits=["val"])
    # An importer that converted pixels otherwise would write other images under the same UIDs.
    to_12_bit = importers._to_12_bit
    monkeypatch.setattr(importers, "_to_12_bit", lambda image: 4095 - to_12_bit(image))

    with pytest.raises(
        ValueError,
        match=r"refused 4 of the images imported from val 0\.\.3 "
        r"\(uid-conflict: 4\); the first: uid-conflict: .* has other pixel data",
    ):
        import_npz(settings, session_factory, store, path, TASK, splits=["val"])


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_radflow_import_npz_of_volumes_makes_ct_series(
    settings: Settings,
    session_factory: sessionmaker[Session],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cli.main import main

    rng = np.random.default_rng(0)
    path = tmp_path / "volumes.npz"
    np.savez(
        path,
        train_images=rng.integers(0, 256, (2, 5, 6, 7), dtype=np.uint8),
        train_labels=np.array([[0], [1]], dtype=np.uint8),
    )
    monkeypatch.setenv("RADFLOW_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("RADFLOW_PSEUDONYM_KEY", settings.pseudonym_key.get_secret_value())

    assert main(["import", "npz", str(path), "--task", "adrenal-ct-3d"]) == 0

    assert "2 studies (train: 2); stored 10" in capsys.readouterr().out
    with session_factory() as session:
        slices = session.scalars(select(Instance).order_by(Instance.id)).all()
        labels = session.scalars(select(Label).order_by(Label.id)).all()
    assert [lb.value for lb in labels] == ["normal", "mass"]
    assert {(s.rows, s.columns, tuple(s.pixel_spacing or ())) for s in slices} == {(6, 7, (1, 1))}
    assert [s.image_position for s in slices[:3]] == [[0, 0, 0], [0, 0, 1], [0, 0, 2]]
    assert slices[0].image_orientation == [1, 0, 0, 0, 1, 0]


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_images_and_volumes_each_need_a_task_of_their_kind(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    tmp_path: Path,
) -> None:
    images = _npz(tmp_path / "images.npz")
    volumes = tmp_path / "volumes.npz"
    np.savez(volumes, train_images=np.zeros((1, 4, 4, 4), np.uint8), train_labels=[[0]])

    with pytest.raises(ValueError, match=r"\(N, D, H, W\) uint8 volumes .* got uint8 of shape"):
        import_npz(settings, session_factory, store, images, "adrenal-ct-3d")
    with pytest.raises(ValueError, match="import volumes with a task on volumes"):
        import_npz(settings, session_factory, store, volumes, TASK)
