"""The receiver's counters and its indexer's health, shared by its threads and saved where
``radflow status`` reads them.

The counts run since the spool was created (a restart loads and continues them). The file is
rewritten atomically (temporary file, rename); it is a report, not a record, so it is not
fsynced: the database's Rejection rows and Instance rows are the durable truth.

The indexer's health (``"indexer"`` in the file) is what another process can tell about a
thread of this one: its state, the process id, a heartbeat rewritten every
:data:`HEARTBEAT_SECONDS` while it runs, when it last indexed a batch, and the failures it met.
:func:`indexer_health` turns that into ``alive`` or not for ``radflow status``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

FIELDS = ("received", "spooled", "indexed", "duplicates", "index_retries")
# How often a running indexer rewrites its heartbeat, and how old one may be while it is alive
# (its longest wait between beats is one batch: seconds).
HEARTBEAT_SECONDS = 2.0
STALE_AFTER_SECONDS = 60.0
RUNNING, STOPPED, DEAD = "running", "stopped", "dead"
GONE = "gone"  # said "running", but its process or its heartbeat is gone (killed)


class ReceiverCounters:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._values: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._indexer: dict[str, Any] = {"state": STOPPED, "errors": 0}
        self._dirty = False
        self._load()

    def _load(self) -> None:
        saved = load_counters(self.path)
        if saved is None:
            return
        self._values.update({k: int(saved.get(k, 0)) for k in FIELDS})
        self._rejected.update({str(k): int(v) for k, v in saved.get("rejected", {}).items()})
        indexer = saved.get("indexer") or {}
        for name in ("errors", "last_batch", "last_error", "last_error_at"):
            if name in indexer:
                self._indexer[name] = indexer[name]

    def add(self, name: str, n: int = 1) -> None:
        assert name in FIELDS, name
        with self._lock:
            self._values[name] += n
            self._dirty = True

    def reject(self, reason: str) -> None:
        with self._lock:
            self._rejected[reason] += 1
            self._dirty = True

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {k: self._values[k] for k in FIELDS}
            out["rejected"] = dict(sorted(self._rejected.items()))
            return out

    # -- the indexer's health ----------------------------------------------------------------

    def indexer_state(self, state: str, error: str | None = None) -> None:
        """The indexer started (RUNNING), stopped, or died of ``error`` (DEAD)."""
        with self._lock:
            self._indexer.update(state=state, pid=os.getpid(), heartbeat=time.time())
            if error is not None:
                self._note_error(error)
            self._dirty = True

    def beat(self) -> None:
        """The indexer is alive; written out at most every :data:`HEARTBEAT_SECONDS`."""
        now = time.time()
        with self._lock:
            if now - float(self._indexer.get("heartbeat", 0.0)) >= HEARTBEAT_SECONDS:
                self._indexer["heartbeat"] = now
                self._dirty = True

    def batch_indexed(self) -> None:
        with self._lock:
            self._indexer["last_batch"] = time.time()
            self._dirty = True

    def indexer_error(self, description: str) -> None:
        """The indexer met a failure: an outage it retries, or a file it set aside."""
        with self._lock:
            self._note_error(description)
            self._dirty = True

    def _note_error(self, description: str) -> None:
        self._indexer["errors"] = int(self._indexer.get("errors", 0)) + 1
        self._indexer["last_error"] = description
        self._indexer["last_error_at"] = time.time()

    def health(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._indexer)

    def save(self, *, force: bool = False) -> None:
        with self._lock:
            if not (self._dirty or force):
                return
            self._dirty = False
        data = {**self.snapshot(), "indexer": self.health()}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)


def load_counters(path: Path) -> dict[str, Any] | None:
    """The last saved counters, or None if no receiver has run with this spool."""
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data


def indexer_health(saved: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """The health of the indexer whose counters are ``saved``, as ``radflow status`` shows it.

    ``alive``: it says it runs, its process exists and its heartbeat is recent (a process killed
    with SIGKILL leaves "running" behind: the other two tell).
    """
    now = time.time() if now is None else now
    indexer = saved.get("indexer") or {}
    state = str(indexer.get("state", STOPPED))
    heartbeat = indexer.get("heartbeat")
    alive = (
        state == RUNNING
        and _process_exists(indexer.get("pid"))
        and heartbeat is not None
        and now - float(heartbeat) < STALE_AFTER_SECONDS
    )
    return {
        "state": state if alive or state != RUNNING else GONE,
        "alive": alive,
        "last_batch_at": _iso(indexer.get("last_batch")),
        "errors": int(indexer.get("errors", 0)),
        "last_error": indexer.get("last_error"),
        "last_error_at": _iso(indexer.get("last_error_at")),
    }


def _process_exists(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True


def _iso(timestamp: object) -> str | None:
    if not isinstance(timestamp, int | float):
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
