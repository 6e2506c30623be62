"""Leases: one holder at a time, renewed while it works, taken over seconds after it dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from radflow import leases
from radflow.settings import Settings

TTL = timedelta(seconds=1.5)

# A holder in its own process: takes the lease, renews it, says so, then works until killed.
HOLDER = """
import sys, time
from datetime import timedelta
from radflow import leases
from radflow.db import make_engine, make_sessionmaker
factory = make_sessionmaker(make_engine(sys.argv[1]))
assert leases.try_acquire(factory, "work", "holder-a", timedelta(seconds=1.5)).ok
with leases.Renewed(factory, "work", "holder-a", timedelta(seconds=1.5)):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_one_holder_at_a_time_until_it_releases(session_factory: sessionmaker[Session]) -> None:
    first = leases.try_acquire(session_factory, "work", "a", TTL)
    assert first.ok and first.taken_over is None
    second = leases.try_acquire(session_factory, "work", "b", TTL)
    assert not second.ok and second.current is not None and second.current.holder == "a"
    assert leases.try_acquire(session_factory, "work", "a", TTL).ok  # its own lease: renewed
    leases.release(session_factory, "work", "a")
    assert leases.try_acquire(session_factory, "work", "b", TTL).ok


def test_a_killed_holder_is_taken_over_within_its_time_to_live(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, settings.database_url],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
        # Alive, it renews: a waiting taker sees that and leaves at once, without the lease.
        alive = leases.wait_turn(session_factory, "work", "b", TTL, poll_seconds=0.05)
        assert not alive.ok and alive.current is not None and alive.current.holder == "holder-a"
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
        # Dead, it stops renewing: the lease is ours once it expires, and we learn whose it was.
        took = leases.wait_turn(session_factory, "work", "b", TTL, poll_seconds=0.05)
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait()
    assert took.ok and took.taken_over is not None and took.taken_over.holder == "holder-a"


def test_turns_leave_no_work_behind(session_factory: sessionmaker[Session]) -> None:
    """A run arriving while another works leaves at once; the worker picks its work up."""
    queue = ["s1"]
    done: list[str] = []
    working = threading.Event()
    go_on = threading.Event()

    def work() -> int:
        working.set()
        go_on.wait(10)
        taken = list(queue)
        queue.clear()
        done.extend(taken)
        return len(taken)

    first: list[int] = []
    runner = threading.Thread(
        target=lambda: first.extend(
            leases.take_turns(
                session_factory, "score", "run-1", TTL, work=work, more=lambda: bool(queue)
            )
        )
    )
    runner.start()
    assert working.wait(10)
    queue.append("s2")  # arrives while run-1 works; run-2 is started for it and leaves
    second = leases.take_turns(
        session_factory, "score", "run-2", TTL, work=work, more=lambda: bool(queue)
    )
    go_on.set()
    runner.join(10)
    assert second == [] and sum(first) == 2 and done == ["s1", "s2"]  # each once, none left
