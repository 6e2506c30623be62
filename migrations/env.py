"""Alembic environment: the only path by which Radflow's schema is created or changed."""

from __future__ import annotations

from alembic import context

import radflow.db  # noqa: F401  (registers every table on Base.metadata)
from radflow.db.base import Base
from radflow.db.session import make_engine

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None:
    # Run from the `alembic` command line: the database is the one the settings name, so
    # `alembic upgrade head` and the platform never disagree about where the schema lives.
    from radflow.settings import Settings

    config.set_main_option("sqlalchemy.url", Settings().database_url.replace("%", "%%"))


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is None:
        engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
        try:
            with engine.connect() as connection:
                _run(connection)
        finally:
            # An idle pooled connection would block CREATE DATABASE ... TEMPLATE and hold a
            # PostgreSQL slot for the life of the process.
            engine.dispose()
    else:
        _run(connectable)


def _run(connection: object) -> None:
    # render_as_batch: SQLite can only ALTER by copying tables; batch mode does that for us.
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
