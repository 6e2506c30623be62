"""The models page's services: versions, evaluation from labelled studies, promote, rollback."""

from __future__ import annotations

import pytest
from factories import add_variant, make_model_version, make_study, make_user
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import (
    AuditEvent,
    ModelEvaluation,
    ModelStatus,
    ModelVariant,
    ModelVersion,
    TrainingRun,
    unit_of_work,
)
from radflow.learning.labels import add_label
from radflow.learning.variants import VariantError
from radflow.services.models import (
    PromotionNeedsReason,
    evaluate,
    labels_since_training,
    list_versions,
    promote,
    request_retrain,
    rollback,
    rollback_serving,
    serve,
)
from radflow.services.users import PermissionDenied, Role
from radflow.store import ObjectStore

TASK = "pneumonia-cxr"


@pytest.fixture
def two_versions(session_factory: sessionmaker[Session], store: ObjectStore) -> dict[str, int]:
    """v1: champion trained on 2 labels, with history; v2: challenger; 6 labelled studies (v1)."""
    with unit_of_work(session_factory) as session:
        run = TrainingRun(
            task=TASK,
            status="completed",
            history={
                "epochs": [
                    {"epoch": 1, "train_loss": 0.7, "val_auc": 0.6},
                    {"epoch": 2, "train_loss": 0.4, "val_auc": 0.8},
                ]
            },
        )
        session.add(run)
        session.flush()
        v1 = make_model_version(session, version=1, threshold=0.5)
        v1.status, v1.training_run_id = ModelStatus.CHAMPION, run.id
        v2 = make_model_version(session, version=2, threshold=0.6)
        cases = [
            (0.9, "pneumonia"),
            (0.8, "pneumonia"),
            (0.3, "pneumonia"),
            (0.6, "normal"),
            (0.2, "normal"),
            (0.1, "normal"),
        ]
        label_ids = []
        for score, value in cases:
            uid = make_study(session, store, score=score, model=v1).study_uid
            label_ids.append(add_label(session, uid, TASK, value, source="test", author="t").id)
        run.label_ids = [str(i) for i in label_ids[:2]]
        return {"v1": v1.id, "v2": v2.id}


def test_versions_carry_status_metrics_snapshot_and_history(
    session_factory: sessionmaker[Session], two_versions: dict[str, int]
) -> None:
    with unit_of_work(session_factory) as session:
        engineer = make_user(session, "max", Role.ML_ENGINEER)
        versions = list_versions(session, engineer)[TASK]
        assert [(v.version, v.status, v.label_snapshot) for v in versions] == [
            (2, "challenger", 0),
            (1, "champion", 2),
        ]
        assert [row["val_auc"] for row in versions[1].history] == [0.6, 0.8]
        assert labels_since_training(session, TASK) == 4


def test_evaluation_uses_labels_the_version_was_not_trained_on(
    session_factory: sessionmaker[Session], two_versions: dict[str, int]
) -> None:
    with unit_of_work(session_factory) as session:
        engineer = make_user(session, "max", Role.ML_ENGINEER)
        evaluation = evaluate(session, engineer, two_versions["v1"])
        assert evaluate(session, engineer, two_versions["v2"]) is None  # v2 scored nothing
    assert evaluation is not None
    # Held out: 0.3 pneumonia, 0.6 / 0.2 / 0.1 normal; at 0.5 one false positive, one miss.
    assert (evaluation.n, evaluation.held_out) == (4, True)
    assert evaluation.confusion == {"tp": 0, "fp": 1, "tn": 2, "fn": 1}
    assert evaluation.auc == pytest.approx(2 / 3)
    assert evaluation.fpr[0] == 0.0 and evaluation.tpr[-1] == 1.0
    assert sum(n for _, _, n in evaluation.calibration) == 4


def test_promote_and_roll_back_are_audited_and_keep_one_champion(
    session_factory: sessionmaker[Session], two_versions: dict[str, int]
) -> None:
    with unit_of_work(session_factory) as session:
        engineer = make_user(session, "max", Role.ML_ENGINEER)
        radiologist = make_user(session, "rita", Role.RADIOLOGIST)
    with unit_of_work(session_factory) as session:
        with pytest.raises(PermissionDenied):
            promote(session, radiologist, TASK, 2)
        with pytest.raises(PermissionDenied):
            request_retrain(session, radiologist, TASK)
        assert promote(session, engineer, TASK, 2).status == ModelStatus.CHAMPION

    def statuses() -> list[tuple[int, str]]:
        with session_factory() as session:
            rows = session.scalars(select(ModelVersion).order_by(ModelVersion.version))
            return [(m.version, ModelStatus(m.status).value) for m in rows]

    assert statuses() == [(1, "retired"), (2, "champion")]
    with unit_of_work(session_factory) as session:
        assert rollback(session, engineer, TASK).version == 1
        request_retrain(session, engineer, TASK)
    # The rolled-back version stays a challenger: it can be promoted again after a fix.
    assert statuses() == [(1, "champion"), (2, "challenger")]
    with session_factory() as session:
        events = session.execute(
            select(AuditEvent.actor, AuditEvent.action, AuditEvent.object_id)
            .where(AuditEvent.action.in_(["promote", "rollback", "retrain"]))
            .order_by(AuditEvent.id)
        ).all()
    assert [tuple(e) for e in events] == [
        ("max", "promote", f"{TASK}:v2"),
        ("max", "rollback", f"{TASK}:v2"),
        ("max", "retrain", TASK),
    ]


def test_variants_are_listed_served_by_engineers_only_and_rolled_back(
    session_factory: sessionmaker[Session], two_versions: dict[str, int]
) -> None:
    with unit_of_work(session_factory) as session:
        engineer = make_user(session, "max", Role.ML_ENGINEER)
        radiologist = make_user(session, "rita", Role.RADIOLOGIST)
        v1 = session.get_one(ModelVersion, two_versions["v1"])
        add_variant(session, v1, "onnx-int8", auc_delta=-0.001, images_per_second=4000)
        add_variant(session, v1, "torch-fp32")
        add_variant(session, v1, "onnx-fp32", passed=False, auc_delta=-0.2)
    with unit_of_work(session_factory) as session:
        with pytest.raises(PermissionDenied):
            serve(session, radiologist, TASK, 1, "onnx-int8")
        with pytest.raises(VariantError, match="may not serve"):
            serve(session, engineer, TASK, 1, "onnx-fp32")  # refused by its check
        assert serve(session, engineer, TASK, 1, "onnx-int8") == "torch-fp32"

    with session_factory() as session:
        listed = {v.version: v for v in list_versions(session, engineer)[TASK]}
    assert (listed[1].serving, listed[2].serving, listed[2].variants) == (
        "onnx-int8",
        "torch-fp32",
        [],
    )
    assert [(v.runtime, v.passed, v.serving) for v in listed[1].variants] == [
        ("torch-fp32", True, False),
        ("onnx-fp32", False, False),
        ("onnx-int8", True, True),
    ]
    int8 = listed[1].variants[2]
    assert (int8.size_mb, int8.images_per_second, int8.auc_delta) == (0.4, 4000, -0.001)

    with unit_of_work(session_factory) as session:
        with pytest.raises(PermissionDenied):
            rollback_serving(session, radiologist, TASK)
        assert rollback_serving(session, engineer, TASK) == "torch-fp32"
    with session_factory() as session:
        assert not any(v.serving for v in session.scalars(select(ModelVariant)))
        events = session.execute(
            select(AuditEvent.actor, AuditEvent.action, AuditEvent.object_id, AuditEvent.details)
            .where(AuditEvent.action.in_(["serve", "serve-rollback"]))
            .order_by(AuditEvent.id)
        ).all()
    assert [(a, b, c, d["runtime"], d["previous"]) for a, b, c, d in events] == [
        ("max", "serve", f"{TASK}:v1", "onnx-int8", "torch-fp32"),
        ("max", "serve-rollback", f"{TASK}:v1", "torch-fp32", "onnx-int8"),
    ]


def test_a_promotion_against_the_statistical_decision_needs_a_typed_reason(
    session_factory: sessionmaker[Session], two_versions: dict[str, int]
) -> None:
    with unit_of_work(session_factory) as session:
        engineer = make_user(session, "max", Role.ML_ENGINEER)
        session.add(
            ModelEvaluation(
                model_version_id=two_versions["v2"],
                champion_version_id=two_versions["v1"],
                task=TASK,
                n_studies=50,
                auc=0.81,
                champion_auc=0.80,
                p_value=0.4,
                alpha=0.05,
                promoted=False,
                reason="AUC not significantly higher than the champion's",
            )
        )
    with unit_of_work(session_factory) as session:
        with pytest.raises(PromotionNeedsReason, match=r"p = 0.4 >= alpha 0.05"):
            promote(session, engineer, TASK, 2)
        with pytest.raises(PromotionNeedsReason):
            promote(session, engineer, TASK, 2, "   ok   ")
    with unit_of_work(session_factory) as session:
        promote(session, engineer, TASK, 2, "v1 misses the new scanner's low-dose images")
    with session_factory() as session:
        promoted = session.scalars(select(AuditEvent).where(AuditEvent.action == "promote")).one()
    assert promoted.actor == "max"
    assert promoted.details["reason"] == (
        "against the statistical decision (p = 0.4 >= 0.05): "
        "v1 misses the new scanner's low-dose images"
    )
