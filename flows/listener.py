"""The worker's listener: stable studies scored in the worker's own, already warm, process.

A flow run a worker starts is a new Python process that imports PyTorch, MONAI and Prefect:
~8 s of CPU on a 2-core machine, most of a study's latency (benchmarks/pipeline.py). So each
``radflow worker`` of the process pool also runs a :class:`Listener` on a thread. One listener
at a time, across machines, holds the listening lease (flows.launcher.LISTENING_LEASE); it
looks for stable studies every :data:`POLL_SECONDS` and runs the process flow for them in the
worker's process (a flow run like any other, with no new process), then the deliver flow on a
second thread (an SR costs ~0.1 s of CPU: the next studies are scored meanwhile).

The receiver sends no event while a listener is live (flows/trigger.py). If the listener's
worker dies, its lease runs out within flows.launcher.LISTENING_TTL: another worker's listener
takes it over, and the receiver emits the event for the studies it handed over meanwhile, so
the process deployment scores them on any worker. A listener that stops (the worker is shut
down) lets go of the lease and then looks once more: a receiver that saw it live a moment
earlier has promoted its studies by then.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from typing import Any

from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from sqlalchemy.orm import Session

from flows.deliver import deliver_flow
from flows.launcher import LISTENING_LEASE, LISTENING_TTL
from flows.process import process_flow, scoring_lease
from radflow import leases
from radflow.db.registry import champion_tasks
from radflow.learning.scoring import has_pending
from radflow.outages import FailureLog
from radflow.runtime import Runtime
from radflow.settings import Settings

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5
"""How often the listener looks for stable studies (one indexed query per task)."""
RETRY_SECONDS = LISTENING_TTL.total_seconds() / 3
"""How often a listener whose lease another worker holds tries to take it (it may have died)."""


class Listener:
    """The listening thread of one worker (module doc): :meth:`start`, then :meth:`stop`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.holder = f"worker/{leases.this_process()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._deliveries = _Deliveries()
        self._failures = FailureLog(logger)

    def start(self) -> Listener:
        self._deliveries.start()
        self._thread = _thread(self._run, "radflow-listener")
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._deliveries.stop(timeout)

    def _run(self) -> None:
        with Runtime.open(self.settings) as rt:
            while not self._stop.is_set():
                try:
                    self._listen(rt)
                except Exception as exc:  # the database restarting: try again, never die
                    self._failures.failed("listening for stable studies", exc)
                    self._stop.wait(RETRY_SECONDS)

    def _listen(self, rt: Runtime) -> None:
        """Hold the lease and score what becomes stable, until stopped or the lease is lost."""
        lease_args = (rt.session_factory, LISTENING_LEASE, self.holder, LISTENING_TTL)
        if not leases.try_acquire(*lease_args).ok:
            self._stop.wait(RETRY_SECONDS)
            return
        logger.info("listening for stable studies (scored in this worker's process)")
        with leases.Renewed(*lease_args) as lease:
            while not self._stop.is_set() and not lease.lost:
                if not self._score_pending(rt):
                    self._stop.wait(POLL_SECONDS)
        # Let go; what a receiver handed over before that is stable in the database now.
        self._score_pending(rt)

    def _score_pending(self, rt: Runtime) -> bool:
        """Run the process flow here if a task has stable studies waiting and no run scores
        them already (it looks again after letting go); whether any study came to an end."""
        with rt.session_factory() as session:
            due = [name for name in champion_tasks(session) if self._due(session, name)]
        if not due:
            return False
        result: dict[str, Any] = process_flow(announce=False)
        if result["scored"]:
            self._deliveries.request()
        if not (result["scored"] or result["no_model"] or result["failed"]):
            # Pending, yet no study came to an end (an outage, a run that took them): no new
            # flow run every poll for it; the next beat of the lease looks again.
            self._stop.wait(RETRY_SECONDS)
            return False
        return True

    @staticmethod
    def _due(session: Session, task_name: str) -> bool:
        scoring = leases.read(session, scoring_lease(task_name))
        return (scoring is None or not scoring.live()) and has_pending(session, task_name)


class _Deliveries:
    """The deliver flow on a thread of its own; requests made while it runs are joined into
    the next run, and one still wanted when it stops runs before it ends."""

    def __init__(self) -> None:
        self._wake = threading.Event()
        self._requested = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._failures = FailureLog(logger)

    def start(self) -> None:
        self._thread = _thread(self._run, "radflow-deliveries")
        self._thread.start()

    def request(self) -> None:
        self._requested = True
        self._wake.set()

    def stop(self, timeout: float) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._requested:
                self._requested = False
                try:
                    deliver_flow()
                except Exception as exc:  # the deliver deployment's schedule sends it later
                    self._failures.failed("delivering results", exc, then="left to the schedule")
            if self._stopping and not self._requested:
                return


def _thread(target: Callable[[], None], name: str) -> threading.Thread:
    """A daemon thread running ``target`` in a copy of the caller's context (Prefect keeps its
    settings, a temporary API URL say, in a context variable, which a new thread would not see),
    its flow runs without heartbeats.

    A flow run's heartbeat thread is joined when the run ends, in steps of 1 s: up to a second
    per run, here per study of a trickle. And the server's zombie automation keeps state per
    run that sends them: under a trickle its SQLite database was locked for a minute. A run of
    the listener that dies with its worker while holding a scoring lease is marked Crashed by
    whoever takes the lease over (flows.launcher.crash_dead_run); between leases it stays
    Running on the server, its work done or left for the next run.
    """
    context = contextvars.copy_context()

    def run() -> None:
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            target()

    return threading.Thread(target=context.run, args=(run,), name=name, daemon=True)
