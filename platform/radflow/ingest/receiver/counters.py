"""The receiver's counters, shared by its threads and saved where ``radflow status`` reads them.

They count since the spool was created (a restart loads and continues them). The file is
rewritten atomically (temporary file, rename); it is a report, not a record, so it is not
fsynced: the database's Rejection rows and Instance rows are the durable truth.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

FIELDS = ("received", "spooled", "indexed", "duplicates", "index_retries")


class ReceiverCounters:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._values: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._dirty = False
        self._load()

    def _load(self) -> None:
        try:
            saved = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return
        self._values.update({k: int(saved.get(k, 0)) for k in FIELDS})
        self._rejected.update({str(k): int(v) for k, v in saved.get("rejected", {}).items()})

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

    def save(self, *, force: bool = False) -> None:
        with self._lock:
            if not (self._dirty or force):
                return
            self._dirty = False
        data = self.snapshot()
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
