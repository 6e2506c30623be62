"""Several receiver processes on one port, so parallel associations use several CPU cores.

pynetdicom runs every association as threads of one Python process: one receiver uses about one
core however many modalities send at once. With ``RADFLOW_RECEIVER_WORKERS=N`` (N > 1),
``radflow receive`` becomes a supervisor that opens the listening socket and starts N receiver
processes accepting from it (the first free worker takes the next association). Each has its own
spool folder ``<spool>/worker-<n>`` and its own indexer, exactly as a single receiver has; the
supervisor runs the periodic step (stable studies -> processing) once for all, restarts a
worker that dies, and stops them all on SIGTERM or Ctrl-C.

Spool folders no worker owns any more (the worker count went down, or from single to several
or back) are drained by the receiver at start, so nothing acknowledged is left behind.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from sqlalchemy.orm import Session, sessionmaker

from radflow.ingest.receiver import tls
from radflow.ingest.receiver.counters import ReceiverCounters
from radflow.ingest.receiver.indexer import Indexer
from radflow.ingest.receiver.spool import Spool, count_waiting
from radflow.settings import Settings
from radflow.store import ObjectStore

logger = logging.getLogger(__name__)

WORKER_PREFIX = "worker-"
# A worker's entry point (radflow/ingest/receiver/worker.py).
WORKER_MODULE = "radflow.ingest.receiver.worker"
RESTART_DELAY_SECONDS = 2.0
DRAIN_TIMEOUT_SECONDS = 600.0


def worker_spool(spool: Path, index: int) -> Path:
    return spool / f"{WORKER_PREFIX}{index}"


def spool_folders(spool: Path) -> list[Path]:
    """Every spool folder under ``spool``: its own (a single receiver's) and the workers'."""
    workers = sorted(p for p in spool.glob(f"{WORKER_PREFIX}*") if p.is_dir())
    return [spool, *workers]


def drain_orphans(
    settings: Settings,
    owned: set[Path],
    *,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
) -> None:
    """Index what waits in spool folders that no running receiver owns, then return."""
    for folder in spool_folders(settings.spool):
        if folder in owned or count_waiting(folder) == 0:
            continue
        logger.info("indexing %d instances left in %s", count_waiting(folder), folder)
        with Spool(folder) as spool:
            counters = ReceiverCounters(spool.stats_path)
            indexer = Indexer(
                spool,
                settings=settings,
                session_factory=session_factory,
                store=store,
                counters=counters,
                quiet_seconds=0.0,
            )
            indexer.start()
            try:
                if not indexer.wait_idle(DRAIN_TIMEOUT_SECONDS):
                    logger.warning("%s not fully indexed yet; the next start goes on", folder)
            finally:
                indexer.stop()
                counters.save(force=True)


def open_listener(host: str, port: int) -> socket.socket:
    """The listening socket the workers share (port 0: a free one is chosen)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=128)


class Supervisor:
    """Starts, watches and stops ``workers`` receiver processes on one port."""

    def __init__(self, settings: Settings, *, host: str, port: int, ae_title: str) -> None:
        self.settings = settings
        self.host, self.ae_title = host, ae_title
        self.workers = settings.receiver_workers
        # A certificate or key the workers could not use stops the supervisor now, rather than
        # each worker in turn, restarted for ever.
        tls.server_context(settings)
        self._listener = open_listener(host, port)
        self.port = int(self._listener.getsockname()[1])
        self._processes: dict[int, subprocess.Popen[bytes]] = {}

    def owned_spools(self) -> set[Path]:
        return {worker_spool(self.settings.spool, k) for k in range(self.workers)}

    def _start(self, index: int) -> None:
        fd = self._listener.fileno()
        command = [sys.executable, "-m", WORKER_MODULE, "--index", str(index)]
        command += ["--listen-fd", str(fd), "--ae-title", self.ae_title]
        self._processes[index] = subprocess.Popen(command, stdin=subprocess.DEVNULL, pass_fds=(fd,))

    def _restart_dead(self) -> None:
        for index, process in list(self._processes.items()):
            code = process.poll()
            if code is None:
                continue
            logger.error("receiver worker %d exited with code %s; restarting it", index, code)
            time.sleep(RESTART_DELAY_SECONDS)  # a worker that cannot start must not spin
            self._start(index)

    def serve_forever(
        self, tick: Callable[[], object] | None = None, tick_seconds: float = 1.0
    ) -> None:
        """Run the workers until SIGTERM or SIGINT; ``tick`` runs every ``tick_seconds`` here."""
        with until_signal() as stopped:
            for index in range(self.workers):
                self._start(index)
            logger.info(
                "DICOM receiver %s: %d worker processes on %s:%d, TLS %s",
                self.ae_title,
                self.workers,
                self.host,
                self.port,
                tls.mode(self.settings),
            )
            try:
                while not stopped.wait(tick_seconds):
                    self._restart_dead()
                    if tick is not None:
                        tick()
            finally:
                self.stop()

    def stop(self) -> None:
        for process in self._processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self._processes.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        self._processes.clear()
        self._listener.close()


@contextmanager
def until_signal() -> Iterator[threading.Event]:
    """An event set by SIGTERM or SIGINT while inside; the previous handlers restored after."""
    stopped = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopped.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stopped
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
