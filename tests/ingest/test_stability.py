"""Study completion on both backends: quiet period, several promoters, late instances reopen."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
from factories import add_prediction, dicom_bytes, make_model_version
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from radflow import ingest
from radflow.db import ModelVersion, Prediction, Study, StudyStatus, TaskOutcome, unit_of_work
from radflow.db.base import utcnow
from radflow.ingest.stability import promote_stable
from radflow.learning.scoring import _pending
from radflow.settings import Settings
from radflow.store import ObjectStore


def _send(
    tmp_path: Path,
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    study_uid: str,
    series_uid: str,
) -> None:
    path = tmp_path / f"{generate_uid()}.dcm"
    path.write_bytes(dicom_bytes(study_uid=study_uid, series_uid=series_uid))
    report = ingest.ingest_files(
        [path], settings=settings, session_factory=session_factory, store=store
    )
    assert report.stored == 1


def _study(session_factory: sessionmaker[Session], study_uid: str) -> Study:
    with session_factory() as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        assert study is not None
        return study


def test_study_becomes_stable_only_after_the_quiet_period(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    study_uid = generate_uid()
    _send(tmp_path, settings, session_factory, store, study_uid, generate_uid())
    arrived = _study(session_factory, study_uid).last_instance_at

    with unit_of_work(session_factory) as session:
        assert promote_stable(session, arrived + timedelta(seconds=4), 5.0) == []
    assert _study(session_factory, study_uid).status == StudyStatus.RECEIVING

    later = arrived + timedelta(seconds=6)
    with unit_of_work(session_factory) as session:
        promoted = promote_stable(session, later, 5.0)
    assert [p.study_uid for p in promoted] == [study_uid]
    # Read back through a new session: the state is in the database, not in a process.
    study = _study(session_factory, study_uid)
    assert study.status == StudyStatus.STABLE and study.stable_at is not None
    with unit_of_work(session_factory) as session:
        assert promote_stable(session, later + timedelta(minutes=1), 5.0) == []


def test_concurrent_promoters_promote_each_study_exactly_once(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    uids = [generate_uid() for _ in range(6)]
    for uid in uids:
        _send(tmp_path, settings, session_factory, store, uid, generate_uid())
    now = utcnow() + timedelta(seconds=10)
    results: list[list[str]] = []
    barrier = threading.Barrier(3)

    def promoter() -> None:
        barrier.wait()
        with unit_of_work(session_factory) as session:
            results.append([p.study_uid for p in promote_stable(session, now, 5.0)])

    threads = [threading.Thread(target=promoter) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    promoted = [uid for result in results for uid in result]
    assert sorted(promoted) == sorted(uids)  # all of them, none twice


def test_late_instance_reopens_a_scored_study_and_it_is_scored_again(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    study_uid, series_uid = generate_uid(), generate_uid()
    _send(tmp_path, settings, session_factory, store, study_uid, series_uid)
    with unit_of_work(session_factory) as session:
        assert ingest.mark_stable(session, {study_uid}) == 1
        model = make_model_version(session)
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        first = add_prediction(session, study, model, 0.2)
        study.status = StudyStatus.SCORED
        # Another task found it not applicable: the complete study is routed again too.
        session.add(
            TaskOutcome(
                study_id=study.id,
                task="other-task",
                model_version_id=model.id,
                status=StudyStatus.NO_MODEL,
                reason="no series for other-task",
            )
        )
        first_id, model_id = first.id, model.id

    _send(tmp_path, settings, session_factory, store, study_uid, series_uid)  # late instance
    reopened = _study(session_factory, study_uid)
    assert reopened.status == StudyStatus.RECEIVING
    with unit_of_work(session_factory) as session:
        promoted = promote_stable(session, utcnow() + timedelta(seconds=6), 5.0)
    assert [p.study_uid for p in promoted] == [study_uid]

    with unit_of_work(session_factory) as session:
        # One study, two instances: never split into two studies.
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        assert sum(len(s.instances) for s in study.series) == 2
        assert session.get(Prediction, first_id).superseded  # type: ignore[union-attr]
        assert session.scalars(select(TaskOutcome)).all() == []
        version = session.get(ModelVersion, model_id)
        assert version is not None
        assert [s.study_uid for s in _pending(session, version, 10)] == [study_uid]
        add_prediction(session, study, model, 0.7)
        assert _pending(session, version, 10) == []

    # Still at most one current prediction per study and model: the database refuses a second.
    with pytest.raises(IntegrityError), unit_of_work(session_factory) as session:
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        add_prediction(session, study, session.get_one(type(model), model_id), 0.9)


def test_a_reopen_lost_to_a_concurrent_status_write_is_still_caught(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    study_uid = generate_uid()
    _send(tmp_path, settings, session_factory, store, study_uid, generate_uid())
    with unit_of_work(session_factory) as session:
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        # Scoring wrote SCORED after a late instance had arrived: stable_at < last_instance_at.
        study.status = StudyStatus.SCORED
        study.stable_at = study.last_instance_at - timedelta(seconds=1)
        arrived = study.last_instance_at
    with unit_of_work(session_factory) as session:
        promoted = promote_stable(session, arrived + timedelta(seconds=6), 5.0)
    assert [p.study_uid for p in promoted] == [study_uid]
    assert _study(session_factory, study_uid).status == StudyStatus.STABLE
