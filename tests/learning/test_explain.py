"""Grad-CAM: every classification prediction stores a heat map the dashboard can overlay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from demo.synthetic import write_cxr_studies
from radflow.db import Prediction, unit_of_work
from radflow.ingest import find_files, ingest_files, mark_stable
from radflow.learning import tasks
from radflow.learning.explain import Explainer, heatmap_png, read_heatmap
from radflow.learning.heatmaps import heatmap_volume, read_heatmap_volume
from radflow.learning.registry import register
from radflow.learning.scoring import score_stable
from radflow.learning.training import predict
from radflow.settings import Settings
from radflow.store import ObjectStore

TASK = tasks.get_task("pneumonia-cxr")


def test_explainer_scores_like_predict_and_maps_each_image() -> None:
    torch.manual_seed(0)
    network = TASK.build_network().eval()
    images = torch.rand(5, 1, *TASK.spatial_size)
    assert TASK.network.cam_layer is not None

    scores, maps = Explainer(network, TASK.network.cam_layer)(images, torch.device("cpu"))

    np.testing.assert_allclose(scores, predict(network, images, torch.device("cpu"), 5), atol=1e-5)
    assert maps.shape == (5, *TASK.spatial_size)
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    png = heatmap_png(maps[0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_allclose(read_heatmap(png), maps[0], atol=1 / 255)


@pytest.mark.parametrize("name", ["adrenal-ct-3d", "adrenal-ct-seq"])
def test_volume_tasks_map_each_volume_as_a_volume(name: str) -> None:
    """Both kinds, including the CNN+LSTM whose CAM layer has no weights of its own."""
    task = tasks.get_task(name)
    torch.manual_seed(0)
    network = task.build_network().eval()
    volumes = torch.rand(3, 1, *task.spatial_size)
    assert task.network.cam_layer is not None

    scores, maps = Explainer(network, task.network.cam_layer)(volumes, torch.device("cpu"))

    np.testing.assert_allclose(scores, predict(network, volumes, torch.device("cpu"), 3), atol=1e-5)
    assert maps.shape == (3, *task.spatial_size)
    assert all(m.max() == pytest.approx(1.0) for m in maps)  # not a constant (gradient-less) map
    affine = np.diag([-1.0, 0.7, 0.7, 1.0])
    heat, placed = read_heatmap_volume(heatmap_volume(maps[0], affine))
    np.testing.assert_allclose(heat, maps[0], atol=1 / 255)
    np.testing.assert_array_equal(placed, affine)


def test_scoring_stores_a_gradcam_png_per_prediction(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    tmp_path: Path,
) -> None:
    write_cxr_studies(tmp_path / "in", 3, seed=5, size=64)
    report = ingest_files(
        find_files(tmp_path / "in"), settings=settings, session_factory=session_factory, store=store
    )
    with unit_of_work(session_factory) as session:
        mark_stable(session, report.study_uids)
        register(
            session,
            store,
            TASK,
            TASK.build_network(),
            metrics={},
            threshold=0.5,
            training_run=None,
        )

    scored = score_stable(session_factory, store, TASK.name, batch_size=2)

    assert scored.scored == 3
    with session_factory() as session:
        predictions = session.scalars(select(Prediction)).all()
        for prediction in predictions:
            key = prediction.derived_keys["gradcam"]
            assert key.endswith(f"/{TASK.name}/v1/gradcam.png")
            heat = read_heatmap(store.get_bytes(key))
            assert heat.shape == TASK.spatial_size
