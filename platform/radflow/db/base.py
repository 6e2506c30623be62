"""The declarative base every table hangs on, with constraint names Alembic can diff."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, DateTime, Double, Enum, MetaData
from sqlalchemy.orm import DeclarativeBase

# Deterministic constraint names: without them PostgreSQL and SQLite invent different ones and
# autogenerate reports drift.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: DateTime(timezone=True),
        # Double, as SQLAlchemy 2.1 maps float and as the migrations made these columns; 2.0
        # (pinned for Prefect's scheduler, constraints.txt) would map float to Float.
        float: Double(),
        dict[str, Any]: JSON,
        list[str]: JSON,
        list[float]: JSON,
    }


def value_enum(cls: type[enum.StrEnum], length: int = 16) -> Enum:
    """A column holding a member's value as text: portable, and read back on any dialect
    (no native ENUM type to alter when a member is added)."""
    return Enum(
        cls, native_enum=False, length=length, values_callable=lambda e: [m.value for m in e]
    )
