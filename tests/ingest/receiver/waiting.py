"""Waiting for what the receiver does in its own threads, and what it leaves in its spool."""

from __future__ import annotations

import time
from collections.abc import Callable

from radflow.ingest.receiver import Spool


def eventually(check: Callable[[], object], timeout: float = 5.0) -> bool:
    """Whether ``check()`` comes true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def leftovers(spool: Spool) -> list[str]:
    """Files of incoming/ with data in them (not the empty files made ahead for the next
    datasets); one the receiver removes while this looks is not one."""
    found = []
    for path in spool.incoming.iterdir():
        try:
            if path.stat().st_size:
                found.append(path.name)
        except FileNotFoundError:
            continue
    return found
