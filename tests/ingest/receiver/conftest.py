"""The receiver under test, started in-process on a free loopback port."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy.orm import Session, sessionmaker

from radflow.ingest.receiver import Receiver
from radflow.settings import Settings
from radflow.store import ObjectStore


@pytest.fixture
def start_receiver(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore
) -> Iterator[Callable[..., Receiver]]:
    """Start an in-process receiver on a free loopback port; ``**changes`` adjust its settings."""
    started: list[Receiver] = []

    def start(**changes: object) -> Receiver:
        receiver = Receiver(
            settings.model_copy(update={"receiver_host": "127.0.0.1", **changes}),
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
