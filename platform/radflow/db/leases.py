"""Leases: who holds a piece of exclusive work (scoring a task, training a task), until when.

A holder renews its lease while it works (radflow.leases); one whose process died stops renewing,
and the lease expires within its time to live, so the next run takes over in seconds instead of
waiting for anyone to notice. Expiry is judged against the clock of the machine asking:
machines that share a database keep their clocks in step (NTP), which time-to-lives of tens of
seconds tolerate.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from radflow.db.base import Base, utcnow


class Lease(Base):
    __tablename__ = "lease"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    acquired_at: Mapped[datetime] = mapped_column(default=utcnow)
    renewed_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
