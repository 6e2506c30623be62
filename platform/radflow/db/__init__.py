"""Database models and sessions (SQLAlchemy 2.0; schema made only by Alembic migrations)."""

from radflow.db import triage as triage  # keeps Study.triage_rank in step with predictions
from radflow.db.audit import AuditEvent, Rejection
from radflow.db.base import Base
from radflow.db.delivery import Delivery, DeliveryStatus, ResultKind, ResultObject
from radflow.db.evaluation import EvaluationSet, ModelEvaluation
from radflow.db.imaging import Instance, Patient, Series, Study, StudyStatus
from radflow.db.leases import Lease
from radflow.db.registry import (
    ModelStatus,
    ModelVariant,
    ModelVersion,
    TrainingRun,
    VariantRuntime,
)
from radflow.db.results import Label, Prediction, TaskOutcome
from radflow.db.session import (
    ensure_schema,
    make_engine,
    make_sessionmaker,
    unit_of_work,
    upgrade,
)
from radflow.db.users import DashboardSession, LoginThrottle, User

__all__ = [
    "AuditEvent",
    "Base",
    "DashboardSession",
    "Delivery",
    "DeliveryStatus",
    "EvaluationSet",
    "Instance",
    "Label",
    "Lease",
    "LoginThrottle",
    "ModelEvaluation",
    "ModelStatus",
    "ModelVariant",
    "ModelVersion",
    "Patient",
    "Prediction",
    "Rejection",
    "ResultKind",
    "ResultObject",
    "Series",
    "Study",
    "StudyStatus",
    "TaskOutcome",
    "TrainingRun",
    "User",
    "VariantRuntime",
    "ensure_schema",
    "make_engine",
    "make_sessionmaker",
    "unit_of_work",
    "upgrade",
]
