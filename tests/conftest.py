"""Fixtures shared by every test: settings on both backends, and the engine, sessions and store.

A test that asks for ``settings`` (or ``engine``, ``session_factory``, ``store``) runs twice:

- ``sqlite-local``: the embedded default, a SQLite file and a local object folder in tmp_path;
- ``postgres-s3``: real PostgreSQL (pgserver) and real S3 (SeaweedFS), a fresh database and a
  fresh bucket per test. The servers start once per session, and only if such a test runs.
  ``-m "not postgres_s3"`` deselects these.

Without the servers' wheels the postgres-s3 tests are skipped, except under CI (``CI=true``),
where they fail: CI must never pass by skipping the production backends.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from pydantic import SecretStr
from servers import PostgresServer, PrefectServer, SeaweedS3, ServerUnavailable
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import make_engine, make_sessionmaker, upgrade
from radflow.settings import Settings
from radflow.store import ObjectStore, open_store

T = TypeVar("T")

# Not the public development key, which commands that take in studies refuse.
TEST_PSEUDONYM_KEY = SecretStr("radflow-test-pseudonym-key-not-for-patient-data")

BACKENDS = [
    pytest.param("sqlite-local", id="sqlite-local"),
    pytest.param("postgres-s3", id="postgres-s3", marks=pytest.mark.postgres_s3),
]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _started(start: Callable[[], T]) -> T:
    """``start()``, or skip (fail under CI) the test if the server cannot run here."""
    try:
        return start()
    except ServerUnavailable as exc:
        problem = exc
    # Outside the except block, so the report shows only the cause, not a chained traceback.
    if in_ci():
        pytest.fail(f"CI=true, so the production backends must run, but: {problem}", pytrace=False)
    reason = str(problem).splitlines()[0]
    pytest.skip(f"{reason} (under CI=true this is a failure)")


@pytest.fixture(scope="session")
def _s3_launched() -> Iterator[SeaweedS3]:
    """The SeaweedFS process, started but maybe not answering yet (it boots in ~3 s)."""
    server = _started(SeaweedS3.launch)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3(_s3_launched: SeaweedS3) -> SeaweedS3:
    """A running S3 server (SeaweedFS) for the whole session."""
    _started(_s3_launched.wait_ready)
    return _s3_launched


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A running PostgreSQL server for the whole session."""
    server = _started(PostgresServer.start)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[PrefectServer]:
    """A live Prefect server (``prefect server start``) for the whole session, services and all."""
    server = _started(PrefectServer.start)
    yield server
    server.stop()


@pytest.fixture
def no_waiting_runs(prefect_server: PrefectServer) -> Iterator[PrefectServer]:
    """The session's server with no unfinished process run before and after the test: no
    stable-study event is held back for a run another test left waiting."""
    prefect_server.delete_unfinished_runs()
    yield prefect_server
    prefect_server.delete_unfinished_runs()


def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own RADFLOW_* variables must not change what a test sees.
    for name in list(os.environ):
        if name.upper().startswith("RADFLOW_"):
            monkeypatch.delenv(name)


@pytest.fixture(params=BACKENDS)
def settings(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """Settings for a migrated, empty database and an empty object store, on each backend."""
    _clean_environment(monkeypatch)
    data_dir = tmp_path / "data"
    if request.param == "sqlite-local":
        # Empty URLs select the defaults: <data_dir>/radflow.db and <data_dir>/objects.
        local = Settings(
            data_dir=data_dir, database_url="", store_url="", pseudonym_key=TEST_PSEUDONYM_KEY
        )
        upgrade(local.database_url)
        yield local
        return

    request.getfixturevalue("_s3_launched")  # SeaweedFS boots while PostgreSQL starts
    postgres: PostgresServer = request.getfixturevalue("postgres")
    s3: SeaweedS3 = request.getfixturevalue("s3")
    database_url = postgres.fresh_database()
    bucket = s3.fresh_bucket_name()
    yield Settings(
        data_dir=data_dir,
        database_url=database_url,
        store_url=f"s3://{bucket}",
        s3_endpoint=s3.endpoint,
        s3_access_key=s3.access_key,
        s3_secret_key=SecretStr(s3.secret_key),
        s3_secure=False,
        s3_region=None,
        pseudonym_key=TEST_PSEUDONYM_KEY,
    )
    postgres.drop_database(str(make_url(database_url).database))
    s3.remove_bucket(bucket)


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings.database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session_factory(engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(engine)


@pytest.fixture
def store(settings: Settings) -> ObjectStore:
    return open_store(settings)
