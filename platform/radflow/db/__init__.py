"""Database models and sessions (SQLAlchemy 2.0; schema made only by Alembic migrations)."""

from radflow.db.audit import AuditEvent, Rejection
from radflow.db.base import Base
from radflow.db.imaging import Instance, Patient, Series, Study, StudyStatus
from radflow.db.registry import ModelStatus, ModelVersion, TrainingRun
from radflow.db.results import Label, Prediction
from radflow.db.session import make_engine, make_sessionmaker, unit_of_work, upgrade

__all__ = [
    "AuditEvent",
    "Base",
    "Instance",
    "Label",
    "ModelStatus",
    "ModelVersion",
    "Patient",
    "Prediction",
    "Rejection",
    "Series",
    "Study",
    "StudyStatus",
    "TrainingRun",
    "make_engine",
    "make_sessionmaker",
    "unit_of_work",
    "upgrade",
]
