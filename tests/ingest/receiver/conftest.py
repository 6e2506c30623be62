"""The receiver under test, started in-process on a free loopback port, on each receiving path.

A test that asks for ``receiver_path`` (or ``receiver``, ``start_receiver``) runs on the fast
path and on the plain one (pynetdicom's public API only, ``RADFLOW_RECEIVER_FAST_PATH=false``).
The plain path runs on the sqlite-local backend only: how a dataset is received does not depend
on the database and object store behind the spool, and the peer tests are the slow ones.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from radflow.ingest.receiver import Receiver
from radflow.settings import Settings
from radflow.store import ObjectStore

PATHS = ["fast", "plain"]


@pytest.fixture(params=PATHS)
def receiver_path(request: pytest.FixtureRequest) -> str:
    """The receiving path under test: "fast" or "plain"."""
    return str(request.param)


@pytest.fixture
def receiver_settings(settings: Settings, receiver_path: str) -> Settings:
    """``settings`` for a receiver on the path under test, listening on loopback."""
    return settings.model_copy(
        update={"receiver_fast_path": receiver_path == "fast", "receiver_host": "127.0.0.1"}
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    plain_on_postgres = {
        item
        for item in items
        if (spec := getattr(item, "callspec", None)) is not None
        and spec.params.get("receiver_path") == "plain"
        and spec.params.get("settings") == "postgres-s3"
    }
    if plain_on_postgres:
        config.hook.pytest_deselected(items=list(plain_on_postgres))
        items[:] = [item for item in items if item not in plain_on_postgres]


@pytest.fixture
def start_receiver(
    receiver_settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
) -> Iterator[Callable[..., Receiver]]:
    """Start an in-process receiver on a free loopback port; ``**changes`` adjust its settings."""
    started: list[Receiver] = []

    def start(**changes: object) -> Receiver:
        receiver = Receiver(
            receiver_settings.model_copy(update=changes),
            session_factory=session_factory,
            store=store,
            port=0,
        )
        receiver.start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


@pytest.fixture
def receiver(start_receiver: Callable[..., Receiver]) -> Receiver:
    return start_receiver()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """A tmpfs of the given size at a fresh folder (skipped where mounting is not allowed)."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        folder = tmp_path / f"disk-{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (root needed): {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)
