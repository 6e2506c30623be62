"""Training, metrics and the registry, without Prefect."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

from demo.synthetic import chest_phantom
from radflow.db import ModelStatus, unit_of_work
from radflow.errors import NotEnoughLabels
from radflow.learning import tasks
from radflow.learning.device import autocast, cpu_threads, select_device
from radflow.learning.evaluation import binary_metrics, youden_threshold
from radflow.learning.inference import load_network, predict
from radflow.learning.preprocess import preprocess
from radflow.learning.registry import champion, register
from radflow.learning.tasks import TrainingPlan
from radflow.learning.training import Example, _check_enough, fit, split_by_patient
from radflow.store import ObjectStore

TASK = tasks.get_task("pneumonia-cxr")


def _examples(n_patients: int, per_patient: int) -> list[Example]:
    return [
        Example(label_id=p * 10 + i, object_key=f"k{p}-{i}", patient=f"P{p}", target=float(i % 2))
        for p in range(n_patients)
        for i in range(per_patient)
    ]


def test_split_keeps_each_patient_on_one_side() -> None:
    train, val = split_by_patient(_examples(50, 3), val_fraction=0.2, seed=7)

    assert {e.patient for e in train}.isdisjoint({e.patient for e in val})
    assert len({e.patient for e in val}) == 10 and len(train) + len(val) == 150
    assert split_by_patient(_examples(50, 3), 0.2, seed=7) == (train, val)


def test_metrics_at_threshold() -> None:
    targets = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.7, 0.6, 0.8, 0.9])

    metrics = binary_metrics(targets, scores, threshold=0.5)

    assert metrics["auc"] == pytest.approx(8 / 9)
    assert metrics["sensitivity"] == 1.0 and metrics["specificity"] == pytest.approx(2 / 3)
    assert metrics["accuracy"] == pytest.approx(5 / 6)
    # Youden picks the cut that separates best: here 0.6 (sens 1, spec 2/3) or 0.8 (2/3, 1).
    assert youden_threshold(targets, scores) in (pytest.approx(0.6), pytest.approx(0.8))


def test_too_few_labels_says_what_to_do() -> None:
    one_class = [dataclasses.replace(e, target=1.0) for e in _examples(30, 1)]
    with pytest.raises(NotEnoughLabels, match="Label more studies"):
        _check_enough(TASK, one_class)


def _phantoms(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    targets = (np.arange(n) % 2).astype(np.float32)
    images = [
        preprocess(TASK, chest_phantom(rng, 128, bool(t)).astype(np.float32)) for t in targets
    ]
    return torch.stack(images), torch.from_numpy(targets)


def test_fit_learns_to_find_opacities() -> None:
    task = dataclasses.replace(
        TASK, plan=TrainingPlan(epochs=15, batch_size=16, learning_rate=2e-3)
    )
    train, val = _phantoms(160, seed=1), _phantoms(100, seed=2)

    with cpu_threads(1):  # as train_task runs it (settings.torch_threads)
        result = fit(task, train, val, seed=0, device=select_device(), progress=False)

    assert len(result.history) == 15
    # 160 small phantoms and 15 short epochs reach ~0.80 here; chance is 0.5.
    assert binary_metrics(result.val_targets, result.val_scores, 0.5)["auc"] > 0.75
    # The kept network is the best epoch's, and predicting again reproduces its scores.
    again = predict(result.network, val[0], select_device(), batch_size=7)
    np.testing.assert_allclose(again, result.val_scores, atol=1e-5)


def test_register_first_version_is_champion_then_challengers(
    session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    device = select_device()
    first, second = TASK.build_network(), TASK.build_network()
    with unit_of_work(session_factory) as session:
        v1 = register(
            session, store, TASK, first, metrics={"auc": 0.9}, threshold=0.4, training_run=None
        )
        v2 = register(
            session, store, TASK, second, metrics={"auc": 0.95}, threshold=0.5, training_run=None
        )
    assert (v1.version, v1.status, v2.version, v2.status) == (
        1,
        ModelStatus.CHAMPION,
        2,
        ModelStatus.CHALLENGER,
    )
    assert v2.parent_id == v1.id
    with session_factory() as session:
        found = champion(session, TASK.name)
        assert found is not None and found.id == v1.id
        loaded = load_network(store, found, device)
    x = torch.rand(3, 1, *TASK.spatial_size)
    first.eval()
    with torch.no_grad(), autocast(device):
        np.testing.assert_allclose(loaded(x).numpy(), first(x).numpy(), atol=1e-6)


def test_device_falls_back_to_cpu_without_cuda() -> None:
    # This machine has no GPU: the CUDA path (autocast fp16, grad scaling) cannot run here.
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; this checks the CPU fallback")
    assert select_device().type == "cpu"
