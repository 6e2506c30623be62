"""Engines and sessions: created from settings, passed in explicitly."""

from __future__ import annotations

import fcntl
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from radflow.errors import SchemaNotCurrent
from radflow.store.durable import private_file

if TYPE_CHECKING:
    from alembic.config import Config


def migrations_dir() -> Path:
    """Alembic's script folder, shipped inside the package (radflow.migrations)."""
    return Path(str(files("radflow.migrations")))


def make_engine(database_url: str) -> Engine:
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            # SQLite would create it 0644; its -wal and -shm files take the database's mode.
            private_file(Path(url.database))
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    # WAL lets the dashboard read while a flow writes; foreign keys are off by default in SQLite.
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def unit_of_work(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: committed when the block ends, rolled back if it raises."""
    with factory() as session, session.begin():
        yield session


def upgrade(database_url: str) -> None:
    """Bring the schema to the latest Alembic revision (the only way the schema is made)."""
    from alembic import command

    # "heads": parallel feature branches of the migration graph all apply until they are merged.
    command.upgrade(alembic_config(database_url), "heads")


def alembic_config(database_url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def schema_revisions(engine: Engine) -> frozenset[str] | None:
    """The Alembic revisions the database is at; None if it has no schema at all."""
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        rows = connection.execute(text("SELECT version_num FROM alembic_version"))
        return frozenset(str(row[0]) for row in rows)


@functools.cache
def head_revisions() -> frozenset[str]:
    """The latest revisions of the migrations this Radflow ships (read once per process)."""
    from alembic.script import ScriptDirectory

    return frozenset(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads())


@contextmanager
def _creation_lock(database: str | None) -> Iterator[None]:
    """Held by the one process that creates an empty embedded database (a lock file beside it)."""
    if not database or database == ":memory:":
        yield
        return
    lock = Path(f"{database}.create-lock")
    private_file(lock)
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield


def ensure_schema(engine: Engine, database_url: str) -> None:
    """Check that the schema is at the latest revision; create an empty embedded one.

    An empty SQLite database (the embedded default's first start) is migrated here; any other
    database must be brought up to date by ``radflow migrate``, on purpose: an upgrade of a
    production schema is an operator's decision, and several processes starting at once must
    not race to make it.
    """
    current = schema_revisions(engine)
    heads = head_revisions()
    if current != heads and engine.dialect.name == "sqlite":
        with _creation_lock(engine.url.database):
            # Another process (the receiver and the dashboard started together) may be making
            # it, or have made it, while this one looked: read again under the lock.
            current = schema_revisions(engine)
            if current is None:
                upgrade(database_url)
                return
    if current != heads:
        raise SchemaNotCurrent(
            "no schema" if current is None else ", ".join(sorted(current)), ", ".join(sorted(heads))
        )
