"""Results that leave as DICOM: the SR and SEG objects made from predictions, and their sending.

A ``ResultObject`` is one DICOM object stored as a derived object of a study (an SR for every
reported prediction, the SEG of a segmentation); when its SR could not be made, the row holds
the reason instead of a key, so the prediction is set aside visibly rather than retried forever.
A ``Delivery`` is one object on its way to one destination (routing rules), with its retries.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from radflow.db.base import Base, utcnow, value_enum
from radflow.db.imaging import UID


class ResultKind(enum.StrEnum):
    SR = "sr"
    SEG = "seg"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    PARKED = "parked"  # gave up: waits for someone to fix the cause and re-send


class ResultObject(Base):
    __tablename__ = "result_object"
    __table_args__ = (UniqueConstraint("prediction_id", "kind"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    prediction_id: Mapped[int] = mapped_column(
        ForeignKey("prediction.id", ondelete="CASCADE"), index=True
    )
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    kind: Mapped[ResultKind] = mapped_column(value_enum(ResultKind, 8))
    object_key: Mapped[str | None] = mapped_column(String(255))
    sop_instance_uid: Mapped[str | None] = mapped_column(UID, unique=True)
    error: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Delivery(Base):
    __tablename__ = "delivery"
    __table_args__ = (
        UniqueConstraint("object_key", "destination"),
        # The sender's question: which pending deliveries are due now.
        Index("ix_delivery_due", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    kind: Mapped[ResultKind] = mapped_column(value_enum(ResultKind, 8))
    object_key: Mapped[str] = mapped_column(String(255))
    destination: Mapped[str] = mapped_column(String(64))
    status: Mapped[DeliveryStatus] = mapped_column(
        value_enum(DeliveryStatus, 8), default=DeliveryStatus.PENDING
    )
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    sent_at: Mapped[datetime | None]
