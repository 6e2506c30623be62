"""The schema Alembic builds is exactly the models' schema, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import os
import pprint
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import Base, Instance, Patient, Series, Study, unit_of_work
from radflow.db.session import alembic_config
from radflow.settings import Settings
from radflow.store import keys

STUDY = "1.2.826.0.1.3680043.8.498.7"
SERIES = "1.2.826.0.1.3680043.8.498.7.1"
SOP = "1.2.826.0.1.3680043.8.498.7.1.1"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


def test_migrations_produce_exactly_the_models(engine: Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={
                "compare_type": True,
                "render_as_batch": True,
                "target_metadata": Base.metadata,
            },
        )
        diff = compare_metadata(context, Base.metadata)
    assert diff == [], (
        "the migrated schema differs from radflow.db's models; write a migration "
        "(alembic revision --autogenerate) for:\n" + pprint.pformat(diff)
    )


def test_database_is_at_the_head_revisions(engine: Engine, settings: Settings) -> None:
    heads = ScriptDirectory.from_config(alembic_config(settings.database_url)).get_heads()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_heads()
    assert set(current) == set(heads)


def _series(session: Session) -> Series:
    series = Series(
        series_uid=SERIES,
        modality="CR",
        study=Study(study_uid=STUDY, patient=Patient(pseudonym="pseudonym-1"), modality="CR"),
    )
    session.add(series)
    return series


def _instance(series: Series | None, sop_instance_uid: str = SOP, **columns: object) -> Instance:
    if series is not None:
        columns["series"] = series
    return Instance(
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=CR_IMAGE_STORAGE,
        object_key=keys.original(STUDY, SERIES, sop_instance_uid, "0" * 64),
        size_bytes=1234,
        sha256="0" * 64,
        transfer_syntax_uid=EXPLICIT_VR_LITTLE_ENDIAN,
        **columns,
    )


def _instance_count(factory: sessionmaker[Session]) -> int:
    with factory() as session:
        return session.scalar(select(func.count()).select_from(Instance)) or 0


def test_sop_instance_uid_is_unique_across_transactions(
    session_factory: sessionmaker[Session],
) -> None:
    with unit_of_work(session_factory) as session:
        session.add(_instance(_series(session)))

    # The same instance arriving again later: the database itself refuses the second row.
    with pytest.raises(IntegrityError), unit_of_work(session_factory) as session:
        series = session.scalars(select(Series)).one()
        session.add(_instance(series))

    assert _instance_count(session_factory) == 1


def test_sop_instance_uid_is_unique_within_a_transaction(
    session_factory: sessionmaker[Session],
) -> None:
    with pytest.raises(IntegrityError), unit_of_work(session_factory) as session:
        series = _series(session)
        session.add_all([_instance(series), _instance(series)])

    assert _instance_count(session_factory) == 0  # the whole unit of work rolled back


def test_instance_needs_an_existing_series(session_factory: sessionmaker[Session]) -> None:
    # Foreign keys hold on SQLite too (they are off there unless the engine turns them on).
    orphan = _instance(None, series_id=999_999)
    with pytest.raises(IntegrityError), unit_of_work(session_factory) as session:
        session.add(orphan)


def test_processes_starting_together_on_a_new_data_dir_all_find_one_schema(
    tmp_path: Path,
) -> None:
    """The receiver, the dashboard and a worker started at once on a fresh embedded data dir:
    one creates the database, the others wait for it ("table ... already exists" before)."""
    opening = (
        "from radflow.runtime import Runtime; from radflow.settings import Settings; "
        "Runtime.open(Settings()).close()"
    )
    env = {**os.environ, "RADFLOW_DATA_DIR": str(tmp_path / "data")}
    env = {k: v for k, v in env.items() if k not in ("RADFLOW_DATABASE_URL", "RADFLOW_STORE_URL")}
    starting = [
        subprocess.Popen(
            [sys.executable, "-c", opening], env=env, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    failures = [p.communicate(timeout=120)[1] for p in starting if p.wait(timeout=120) != 0]
    assert failures == []
