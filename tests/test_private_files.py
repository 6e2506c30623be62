"""What Radflow creates on disk is the service user's alone (issue 16): the data folder, the
object store folder and the embedded database are 0700/0600 whatever the umask, and every
``radflow`` command runs with umask 077 (spool, inbox, caches, keys and logs alike)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from factories import dicom_bytes
from pydantic import SecretStr
from pydicom.uid import generate_uid

from cli.main import main
from radflow import ingest
from radflow.runtime import Runtime
from radflow.settings import Settings


@pytest.fixture
def lax_umask() -> Iterator[None]:
    """The usual umask (022), under which Python and SQLite create 0644 files, 0755 folders."""
    before = os.umask(0o022)
    yield
    os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_data_folder_store_and_database_are_private(tmp_path: Path, lax_umask: None) -> None:
    data_dir = tmp_path / "data"
    settings = Settings(
        data_dir=data_dir, database_url="", store_url="", pseudonym_key=SecretStr(generate_uid())
    )
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "a.dcm").write_bytes(dicom_bytes())
    with Runtime.open(settings) as rt:
        ingest.ingest_files(
            ingest.find_files(incoming),
            settings=settings,
            session_factory=rt.session_factory,
            store=rt.store,
        )
    database = data_dir / "radflow.db"
    assert _mode(data_dir) == _mode(data_dir / "objects") == 0o700
    assert _mode(database) == 0o600
    wal = database.with_name("radflow.db-wal")
    assert not wal.exists() or _mode(wal) == 0o600


def test_every_command_runs_with_umask_077(lax_umask: None) -> None:
    assert main(["settings"]) == 0
    try:
        assert os.umask(0o022) == 0o077
    finally:
        os.umask(0o022)
