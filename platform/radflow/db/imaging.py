"""What was received: patients (pseudonymised), studies, series and instances."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from radflow.db.base import Base, utcnow, value_enum

UID = String(64)


class StudyStatus(enum.StrEnum):
    RECEIVING = "receiving"
    STABLE = "stable"
    PROCESSING = "processing"
    SCORED = "scored"
    REVIEWED = "reviewed"
    FAILED = "failed"
    NO_MODEL = "no_model"


class Patient(Base):
    """A patient known only by a keyed pseudonym; the real ID never reaches the database."""

    __tablename__ = "patient"

    id: Mapped[int] = mapped_column(primary_key=True)
    pseudonym: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "study"
    __table_args__ = (Index("ix_study_triage", "triage_rank", "received_at", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    description: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16), index=True)
    status: Mapped[StudyStatus] = mapped_column(
        value_enum(StudyStatus),
        default=StudyStatus.RECEIVING,
        index=True,
    )
    status_reason: Mapped[str | None] = mapped_column(String(255))
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # When the latest new instance arrived: a study is stable once this is a quiet period old.
    last_instance_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    stable_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # Denormalised by radflow.db.triage on every new prediction, so the worklist sorts and pages
    # 100,000 studies on one index instead of finding each study's latest prediction per request.
    # No foreign key: prediction already points at study, and a cycle would complicate deletes.
    latest_prediction_id: Mapped[int | None] = mapped_column(index=True)
    triage_rank: Mapped[int] = mapped_column(default=2)  # 0 flagged, 1 below threshold, 2 unscored

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.number")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    number: Mapped[int | None]
    description: Mapped[str | None] = mapped_column(String(64))
    body_part: Mapped[str | None] = mapped_column(String(16))
    # ImageType of the series' first instance, values joined by "\\" as in DICOM: routing rules
    # match on it (ORIGINAL/DERIVED, LOCALIZER, ...).
    image_type: Mapped[str | None] = mapped_column(String(128))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(
        back_populates="series", order_by="Instance.number"
    )


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    number: Mapped[int | None]
    object_key: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    rows: Mapped[int | None]
    columns: Mapped[int | None]
    frames: Mapped[int] = mapped_column(default=1)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The geometry read at ingest (radflow.dicom.instance.InstanceHeader), so that a series can
    # be checked and ordered as a volume from the index alone, without reading its files
    # (radflow.dicom.geometry). NULL when the instance does not have it (multi-frame instances
    # keep it per frame, read when the volume is loaded).
    image_type: Mapped[str | None] = mapped_column(String(128))
    image_position: Mapped[list[float] | None]
    image_orientation: Mapped[list[float] | None]
    pixel_spacing: Mapped[list[float] | None]
    temporal_position: Mapped[int | None]

    series: Mapped[Series] = relationship(back_populates="instances")
