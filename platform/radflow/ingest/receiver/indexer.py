"""The indexer: a background thread that moves spooled instances into the store and the index.

It takes whatever waits in ``spool/ready`` in batches (one database transaction per batch, see
:func:`radflow.ingest.ingest_batch`) and moves a spool file out of ``ready/`` only after the
commit that indexed it (to ``done/``, deleted when idle). At start it picks up what an earlier
run left. While instances are arriving it stays out of the way (up to a backlog of
``max_deferred``): it shares the process, so its CPU time and its object-store fsyncs would
otherwise slow every sender's acknowledgements; a study is indexed in a few large batches as
soon as its sender pauses.

No file can stop it (:func:`radflow.outages.is_outage` decides, as everywhere):

- **An outage** (the database or the object store unreachable, the disk failing) leaves the
  files where they are and the batch is retried with an exponential backoff, one log line per
  try: it delays indexing but loses nothing, and rejects nothing.
- **Anything else** is about the data: :func:`radflow.ingest.ingest_batch` splits a batch
  that fails so until the file at fault is alone and refuses it with a reason (its
  InvalidInstance reason, or ``unprocessable`` for an unexpected error, whose traceback is
  logged once); the indexer moves that file to ``spool/rejected`` with a Rejection row, and
  the others are indexed. A value PostgreSQL refuses (DataError) is such a failure, not an
  outage; values the index's columns cannot hold are checked before the batch.

Should the thread die anyway (a bug outside the files' processing), :attr:`Indexer.failure`
says why: the receiver then stops acknowledging and exits non-zero for its supervisor to
restart it (radflow/ingest/receiver/scp.py). Its health is saved with the counters
(:class:`~radflow.ingest.receiver.counters.ReceiverCounters`) for ``radflow status``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from radflow.db import unit_of_work
from radflow.dicom.instance import InstanceHeader, file_sha256, read_header
from radflow.errors import InvalidInstance
from radflow.ingest import ingest_batch, refusal, rejection
from radflow.ingest.receiver.counters import (
    DEAD,
    HEARTBEAT_SECONDS,
    RUNNING,
    STOPPED,
    ReceiverCounters,
)
from radflow.ingest.receiver.spool import Spool
from radflow.ingest.receiver.statuses import UNPROCESSABLE
from radflow.outages import FailureLog, describe, is_outage
from radflow.settings import Settings
from radflow.store import ObjectStore

logger = logging.getLogger(__name__)

BATCH_SIZE = 64
IDLE_POLL_SECONDS = 1.0
MIN_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0
# Indexing waits until no instance arrived for this long, or until this many wait.
QUIET_SECONDS = 0.25
MAX_DEFERRED = 1000
REAP_CHUNK = 16
# The SHA-256 in a header the receiver submits: hashing is the index's business (duplicate or
# conflict), so the indexer does it, off the path of the sender waiting for its response.
UNHASHED = ""

Item = tuple[Path, InstanceHeader]


class Indexer:
    def __init__(
        self,
        spool: Spool,
        *,
        settings: Settings,
        session_factory: sessionmaker[Session],
        store: ObjectStore,
        counters: ReceiverCounters,
        batch_size: int = BATCH_SIZE,
        quiet_seconds: float = QUIET_SECONDS,
        max_deferred: int = MAX_DEFERRED,
    ) -> None:
        self.spool = spool
        self.settings = settings
        self.session_factory = session_factory
        self.store = store
        self.counters = counters
        self.batch_size = batch_size
        self.quiet_seconds = quiet_seconds
        self.max_deferred = max_deferred
        self.failure: BaseException | None = None  # why the thread died, if it did
        self._failures = FailureLog(logger)
        self._last_submit = 0.0
        # Headers the receiver already read while validating, so the indexer need not parse
        # the file again; files found in the spool after a restart are read again.
        self._headers: dict[Path, InstanceHeader] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._run, name="radflow-indexer", daemon=True)

    @property
    def alive(self) -> bool:
        """Started and not dead (a stopped indexer is not alive either; one that failed is dead
        from the moment its failure is known, before its thread has finished logging it)."""
        return self._thread.is_alive() and self.failure is None

    def start(self) -> None:
        self.counters.indexer_state(RUNNING)
        self.counters.save(force=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in progress and stop; what is left stays in the spool."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, path: Path, header: InstanceHeader) -> None:
        """A newly spooled instance (its header already read; its digest may be UNHASHED)."""
        with self._lock:
            self._headers[path] = header
            self._last_submit = time.monotonic()
        self._idle.clear()
        self._wake.set()

    def wait_idle(self, timeout: float) -> bool:
        """Block until the spool is empty (everything indexed or set aside); False on timeout
        or if the indexer died."""
        self._wake.set()
        deadline = time.monotonic() + timeout
        while not self._idle.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            if self.failure is not None or time.monotonic() >= deadline:
                return False
        return True

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # recorded and logged: the receiver stops for it
            self.failure = exc
            logger.critical(
                "the receiver's indexer stopped: nothing more is indexed and the receiver "
                "refuses instances until it is restarted",
                exc_info=exc,
            )
            self.counters.indexer_state(DEAD, describe(exc))
        else:
            self.counters.indexer_state(STOPPED)
        self.counters.save(force=True)

    def _loop(self) -> None:
        backoff = 0.0
        while not self._stopping.is_set():
            self.counters.beat()
            if self._defer():
                continue
            batch = self.spool.waiting(self.batch_size)
            if not batch:
                self._idle.set()
                self.counters.save()
                if self._quiet() and (self.spool.reap(REAP_CHUNK) or self.spool.remove_partial()):
                    continue  # check for new work between chunks: reaping is the least urgent
                self._wake.wait(IDLE_POLL_SECONDS)
                self._wake.clear()
                continue
            self._idle.clear()
            try:
                self.index(batch)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                backoff = min(max(2 * backoff, MIN_BACKOFF_SECONDS), MAX_BACKOFF_SECONDS)
                self.counters.add("index_retries")
                self.counters.indexer_error(describe(exc))
                self._failures.failed(
                    f"indexing {len(batch)} spooled instances",
                    exc,
                    then=f"retrying in {backoff:.1f} s",
                )
                self._pause(backoff)
                continue
            backoff = 0.0
            self.counters.batch_indexed()
            self.counters.save()

    def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` (or until stopped), beating the heartbeat meanwhile."""
        deadline = time.monotonic() + seconds
        while not self._stopping.wait(
            min(HEARTBEAT_SECONDS, max(0.0, deadline - time.monotonic()))
        ):
            self.counters.beat()
            self.counters.save()
            if time.monotonic() >= deadline:
                return

    def _quiet(self) -> bool:
        """No instance arrived for ``quiet_seconds``: deleting files will not slow a sender."""
        with self._lock:
            return time.monotonic() - self._last_submit >= self.quiet_seconds

    def _defer(self) -> bool:
        """Wait a little while senders are busy; True if the caller should check again."""
        with self._lock:
            backlog = len(self._headers)
            quiet_for = time.monotonic() - self._last_submit
        if quiet_for >= self.quiet_seconds or backlog >= self.max_deferred:
            return False
        self._idle.clear()
        self._stopping.wait(self.quiet_seconds - quiet_for)
        return True

    def index(self, batch: list[Path]) -> None:
        """Store and index ``batch``; consume each spool file only once its row is committed.

        Raises only outages; a file that fails otherwise is set aside (ingest_batch isolates
        it by bisection, so the others are indexed).
        """
        items: list[Item] = []
        for path in batch:
            header = self._header(path)
            if header is not None:
                items.append((path, header))
        if not items:
            return
        # Spool files never change once acknowledged: the store may share their bytes.
        report = ingest_batch(
            items,
            settings=self.settings,
            session_factory=self.session_factory,
            store=self.store,
            immutable=True,
        )
        for path, _ in items:
            refused = report.rejected.get(str(path))
            if refused is None:
                self.spool.consume(path)
                self._forget(path)
            else:
                reason, _, message = refused.partition(": ")
                self._set_aside(path, InvalidInstance(reason, message))
        self.counters.add("indexed", report.stored)
        self.counters.add("duplicates", report.duplicates)

    def _header(self, path: Path) -> InstanceHeader | None:
        """The file's header (hashed); None if it was set aside. Raises only outages."""
        with self._lock:
            header = self._headers.get(path)
        try:
            if header is None:
                return read_header(path, self.settings.max_pixels)
            if header.sha256 == UNHASHED:
                return replace(header, sha256=file_sha256(path))
            return header
        except Exception as exc:
            # A file read again after a restart, or changed on disk after it was acknowledged.
            if is_outage(exc):
                raise
            self._set_aside(path, refusal(exc, path.name))
            return None

    def _set_aside(self, path: Path, exc: InvalidInstance) -> None:
        """Keep a refused, already acknowledged instance in spool/rejected, with a Rejection row."""
        kept = self.spool.rejected / path.name
        with unit_of_work(self.session_factory) as session:
            session.add(rejection("receiver", exc, origin=None, quarantine_key=str(kept)[-255:]))
        try:
            self.spool.set_aside(path)
        except FileNotFoundError:
            logger.warning("spooled instance %s vanished before it was set aside", path.name)
        self._forget(path)
        self.counters.reject(exc.reason)
        if exc.reason == UNPROCESSABLE:
            self.counters.indexer_error(str(exc)[:200])
        logger.warning("spooled instance %s refused by the index: %s", path.name, exc.reason)

    def _forget(self, path: Path) -> None:
        with self._lock:
            self._headers.pop(path, None)
