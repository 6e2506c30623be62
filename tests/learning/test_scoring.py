"""Batch scoring: predictions written per chunk, triage kept, the preprocessing cache shared."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from factories import make_study
from monai.visualize import GradCAM
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import ModelVersion, Prediction, Study, StudyStatus, unit_of_work
from radflow.db.base import utcnow
from radflow.db.triage import BELOW_THRESHOLD, FLAGGED
from radflow.ingest import stability
from radflow.learning import scoring, tasks
from radflow.learning.cache import CachedImage, PreprocessCache
from radflow.learning.explain import Explainer
from radflow.learning.inference import load_network, predict
from radflow.learning.registry import promote, register
from radflow.learning.scoring import score_stable
from radflow.settings import Settings
from radflow.store import ObjectStore, keys

TASK = tasks.get_task("pneumonia-cxr")


def _studies(session: Session, store: ObjectStore, n: int) -> list[Study]:
    rng = np.random.default_rng(3)
    return [make_study(session, store, pixels=rng.integers(0, 4096, (48, 40))) for _ in range(n)]


def _register(session: Session, store: ObjectStore, threshold: float) -> ModelVersion:
    torch.manual_seed(int(threshold * 100))
    return register(
        session,
        store,
        TASK,
        TASK.build_network(),
        metrics={},
        threshold=threshold,
        training_run=None,
    )


def test_a_backlog_is_scored_in_chunks_with_triage_latency_and_a_cache_for_training(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(scoring, "BATCHES_PER_TRANSACTION", 2)  # 7 studies: chunks of 4 and 3
    with unit_of_work(session_factory) as session:
        studies = _studies(session, store, 7)
        # A lateral view no rule routes, and an image that is not DICOM at all.
        lateral = make_study(session, store)
        lateral.series[0].description = "CHEST LAT"
        broken = make_study(session, store)
        store.put_bytes(broken.series[0].instances[0].object_key, b"not a DICOM file")
        v1 = _register(session, store, threshold=0.5)
        uids = [s.study_uid for s in studies]
    scored = score_stable(
        session_factory, store, TASK.name, 2, explain=False, cache_dir=settings.cache_dir
    )

    assert (scored.scored, scored.no_model, list(scored.failed)) == (7, 1, [broken.study_uid])
    assert (scored.cache_hits, scored.cache_misses) == (0, 8)
    with session_factory() as session:
        rows = {
            s.study_uid: s for s in session.scalars(select(Study).where(Study.study_uid.in_(uids)))
        }
        predictions = {p.study_id: p for p in session.scalars(select(Prediction))}
        assert len(predictions) == 7
        for study in rows.values():
            prediction = predictions[study.id]
            assert study.status == StudyStatus.SCORED and study.status_reason is None
            assert study.latest_prediction_id == prediction.id
            assert study.triage_rank == (FLAGGED if prediction.score >= 0.5 else BELOW_THRESHOLD)
            assert prediction.scores == {"pneumonia": prediction.score}
            assert prediction.latency_ms > 0 and prediction.derived_keys == {}
        assert session.get_one(Study, lateral.id).status == StudyStatus.NO_MODEL
        failed = session.get_one(Study, broken.id)
        assert failed.status == StudyStatus.FAILED
        assert failed.status_reason and failed.status_reason.startswith("preprocessing:")

        # The scores are the network's on the cached tensors: what training will read back.
        ordered = sorted(rows.values(), key=lambda s: s.id)
        images = [
            CachedImage(s.series[0].instances[0].sha256, s.series[0].instances[0].object_key)
            for s in ordered
        ]
        got = [predictions[s.id].score for s in ordered]
        network = load_network(store, session.get_one(ModelVersion, v1.id), torch.device("cpu"))
    tensors, stats = PreprocessCache(settings.cache_dir, TASK).load(store, images)
    assert (stats.hits, stats.misses) == (7, 0)
    np.testing.assert_allclose(got, predict(network, tensors, torch.device("cpu"), 7), atol=1e-5)


def test_after_a_promotion_unreviewed_studies_are_scored_again_and_history_is_kept(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    with unit_of_work(session_factory) as session:
        studies = _studies(session, store, 3)
        studies[0].status = StudyStatus.REVIEWED  # a radiologist's call is not re-scored
        _register(session, store, threshold=0.5)
        v2 = _register(session, store, threshold=0.0)  # flags everything
    with session_factory() as session:
        assert scoring.has_pending(session, TASK.name)
        assert not scoring.has_pending(session, "adrenal-ct-3d")  # no champion
    first = score_stable(session_factory, store, TASK.name, 4, cache_dir=settings.cache_dir)
    with session_factory() as session:
        assert not scoring.has_pending(session, TASK.name)
    with unit_of_work(session_factory) as session:
        promote(session, session.get_one(ModelVersion, v2.id), actor="test", reason="test")
    with session_factory() as session:
        assert scoring.has_pending(session, TASK.name)  # the new champion's turn
    again = score_stable(session_factory, store, TASK.name, 4, cache_dir=settings.cache_dir)
    assert score_stable(session_factory, store, TASK.name, 4).scored == 0  # nothing left
    with session_factory() as session:
        assert not scoring.has_pending(session, TASK.name)

    assert (first.scored, again.scored) == (2, 2)
    assert (again.cache_hits, again.cache_misses) == (2, 0)
    with session_factory() as session:
        for study in studies[1:]:
            row = session.get_one(Study, study.id)
            history = session.scalars(
                select(Prediction).where(Prediction.study_id == study.id).order_by(Prediction.id)
            ).all()
            assert [p.model_version_id for p in history] == [history[0].model_version_id, v2.id]
            assert row.latest_prediction_id == history[1].id and row.triage_rank == FLAGGED
            # Grad-CAM maps of both versions, each under its own version's key.
            assert [p.derived_keys["gradcam"] for p in history] == [
                keys.derived(study.study_uid, TASK.name, v, "gradcam.png") for v in (1, 2)
            ]
            assert store.exists(history[1].derived_keys["gradcam"])
        assert session.get_one(Study, studies[0].id).latest_prediction_id is None


def test_a_study_reopened_while_its_chunk_is_in_the_network_is_not_written(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A late instance reopens a study (radflow.ingest.stability) after its chunk was read: the
    write
    leaves it RECEIVING, unscored, to be scored whole once it is stable again."""
    with unit_of_work(session_factory) as session:
        studies = _studies(session, store, 3)
        _register(session, store, threshold=0.5)
    reopened = studies[1].id
    infer = scoring._infer

    def late_instance_arrives(*args: object, **kwargs: object) -> object:
        with unit_of_work(session_factory) as session:
            session.get_one(Study, reopened).status = StudyStatus.RECEIVING
        return infer(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(scoring, "_infer", late_instance_arrives)
    report = score_stable(
        session_factory, store, TASK.name, 4, explain=False, cache_dir=settings.cache_dir
    )

    assert report.scored == 2
    with session_factory() as session:
        scored = set(session.scalars(select(Prediction.study_id)))
        assert scored == {studies[0].id, studies[2].id}
        study = session.get_one(Study, reopened)
        assert (study.status, study.latest_prediction_id) == (StudyStatus.RECEIVING, None)


def test_a_backlog_of_pages_is_scored_in_one_pipeline_and_each_study_once(
    settings: Settings,
    engine: Engine,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pages follow each other by place in the queue (received_at, id): the next page is read
    while the previous one's last chunk is still being scored, and no study is read twice; a
    study pending again behind the queue's end (reopened, stable again) gets another pass."""
    monkeypatch.setattr(scoring, "PENDING_PAGE", 3)
    monkeypatch.setattr(scoring, "BATCHES_PER_TRANSACTION", 1)  # batch 2: chunks [2, 1] a page
    with unit_of_work(session_factory) as session:
        studies = _studies(session, store, 7)
        tied = studies[2].received_at
        for study in studies[3:5]:  # received together: across the first page's end, by id
            study.received_at = tied
        _register(session, store, threshold=0.5)
    first = studies[0].id
    infer, calls = scoring._infer, []

    def reopened_meanwhile(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 3:  # the first chunk is written by now: its first study comes back
            with unit_of_work(session_factory) as session:
                stability.promote(session, Study.id == first, utcnow())
        return infer(*args, **kwargs)  # type: ignore[arg-type]

    statements: list[str] = []

    def executed(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.startswith("INSERT INTO prediction"):
            statements.append("insert")
        elif "ORDER BY study.received_at, study.id" in statement:
            statements.append("page")

    monkeypatch.setattr(scoring, "_infer", reopened_meanwhile)
    event.listen(engine, "before_cursor_execute", executed)
    try:
        report = score_stable(
            session_factory, store, TASK.name, 2, explain=False, cache_dir=settings.cache_dir
        )
    finally:
        event.remove(engine, "before_cursor_execute", executed)

    assert report.scored == 8  # 7, and the reopened one again
    with session_factory() as session:
        history = session.execute(
            select(Prediction.study_id, Prediction.superseded).order_by(Prediction.id)
        ).all()
    assert sorted(study_id for study_id, _ in history) == sorted([s.id for s in studies] + [first])
    assert [superseded for study_id, superseded in history if study_id == first] == [True, False]
    # Pages: 3 studies, 3, 1, none; then the second pass: the reopened one, none; and a final
    # pass that finds none. The second page was read after the first chunk was written and
    # before the first page's last chunk was: one pipeline, not drained at each page's end.
    pages = [i for i, what in enumerate(statements) if what == "page"]
    assert len(pages) == 7
    assert statements[: pages[1]].count("insert") == 1


def test_a_cached_tensor_cut_short_is_made_again(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    # Cached tensors are not fsynced: a crash may leave one cut short, which must read as a miss.
    with unit_of_work(session_factory) as session:
        instance = _studies(session, store, 1)[0].series[0].instances[0]
        image = CachedImage(instance.sha256, instance.object_key)
    cache = PreprocessCache(settings.cache_dir, TASK)
    first, stats = cache.load(store, [image])
    assert (stats.hits, stats.misses) == (0, 1)
    (path,) = (settings.cache_dir / "preprocessed").rglob("*.npy")
    path.write_bytes(path.read_bytes()[:100])

    again, stats = PreprocessCache(settings.cache_dir, TASK).load(store, [image])
    assert (stats.hits, stats.misses) == (0, 1)
    torch.testing.assert_close(again, first)
    assert PreprocessCache(settings.cache_dir, TASK).load(store, [image])[1].hits == 1


def test_gradcam_maps_put_the_strongest_evidence_at_one_as_full_gradcam_does() -> None:
    # The explainer stops the backward pass at the CAM layer and scales maps itself; the maps
    # must equal MONAI's Grad-CAM with every gradient, scaled (min, max) -> (0, 1).
    torch.manual_seed(1)
    network = TASK.build_network().eval()
    reference = GradCAM(copy.deepcopy(network), "net.layer_3", postprocessing=lambda m: m)
    images = torch.rand(6, 1, *TASK.spatial_size)
    raw = reference(images, class_idx=0)[:, 0].detach()
    low = raw.flatten(1).min(1).values[:, None, None]
    high = raw.flatten(1).max(1).values[:, None, None]

    _, maps = Explainer(network, "net.layer_3")(images, torch.device("cpu"))

    np.testing.assert_allclose(maps, ((raw - low) / (high - low)).numpy(), atol=1e-5)
    assert all(m.max() == pytest.approx(1.0) for m in maps)
