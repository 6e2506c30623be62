"""The live handles an entry point needs, built once from settings and passed down."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import TracebackType

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import ensure_schema, make_engine, make_sessionmaker, unit_of_work
from radflow.settings import Settings
from radflow.store import ObjectStore, open_store
from radflow.store.durable import private_dir


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    store: ObjectStore

    @classmethod
    def open(cls, settings: Settings) -> Runtime:
        """Connect to the database and the store.

        The schema is not migrated here (a flow run, a page or a command opens a Runtime; a
        migration on each would cost every one of them): ``radflow migrate`` does that. Only an
        empty embedded (SQLite) database is created on first use; a schema at another revision
        raises SchemaNotCurrent, which names the command to run.
        """
        private_dir(settings.data_dir)
        engine = make_engine(settings.database_url)
        try:
            ensure_schema(engine, settings.database_url)
        except BaseException:
            engine.dispose()
            raise
        return cls(settings, engine, make_sessionmaker(engine), open_store(settings))

    def transaction(self) -> AbstractContextManager[Session]:
        """One unit of work: committed when the block ends, rolled back if it raises."""
        return unit_of_work(self.session_factory)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
