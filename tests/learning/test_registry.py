"""The model registry: judged versions, manual promotion and rollback, each audited."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import AuditEvent, ModelEvaluation, ModelStatus, unit_of_work
from radflow.errors import RadflowError
from radflow.learning import tasks
from radflow.learning.registry import champion, get_version, judge, promote, register, rollback
from radflow.store import ObjectStore

TASK = tasks.get_task("pneumonia-cxr")


def _register(session: Session, store: ObjectStore, auc: float) -> object:
    return register(
        session,
        store,
        TASK,
        TASK.build_network(),
        metrics={"auc": auc},
        threshold=0.5,
        training_run=None,
    )


def test_judge_promotes_only_a_significantly_better_version_and_says_why(
    session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    good, better = y + rng.normal(0, 1.5, 300), y + rng.normal(0, 0.5, 300)
    with unit_of_work(session_factory) as session:
        v1 = _register(session, store, 0.7)
        v2 = _register(session, store, 0.9)
        first = judge(session, v2, v1, y, better, good, alpha=0.05, actor="tester")
        v3 = _register(session, store, 0.9)
        second = judge(session, v3, v2, y, better + 0.001, better, alpha=0.05, actor="tester")

    assert first.promoted and second.promoted is False
    with session_factory() as session:
        statuses = {v: get_version(session, TASK.name, v).status for v in (1, 2, 3)}
        assert statuses == {
            1: ModelStatus.RETIRED,
            2: ModelStatus.CHAMPION,
            3: ModelStatus.CHALLENGER,
        }
        evaluations = session.scalars(select(ModelEvaluation).order_by(ModelEvaluation.id)).all()
        assert [e.promoted for e in evaluations] == [True, False]
        assert "DeLong p" in evaluations[1].reason and evaluations[1].p_value is not None
        assert "challenger" in get_version(session, TASK.name, 3).metrics["decision"]


def test_manual_promote_and_rollback_are_audited(
    session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    with unit_of_work(session_factory) as session:
        _register(session, store, 0.8)
        v2 = _register(session, store, 0.85)
        promote(session, v2, actor="dr-who", reason="promoted by hand")

    with unit_of_work(session_factory) as session:
        restored = rollback(session, TASK.name, actor="dr-who")
        assert restored.version == 1
    with session_factory() as session:
        current = champion(session, TASK.name)
        assert current is not None and current.version == 1
        assert get_version(session, TASK.name, 2).status == ModelStatus.CHALLENGER
        actions = session.scalars(
            select(AuditEvent.action).where(AuditEvent.actor == "dr-who").order_by(AuditEvent.id)
        ).all()
        assert actions == ["promote", "rollback"]

    with (
        unit_of_work(session_factory) as session,
        pytest.raises(RadflowError, match="nothing to roll back"),
    ):
        rollback(session, TASK.name, actor="dr-who")
