"""What ``radflow status`` tells of the receiver, read from its spool folders alone (no DICOM
networking loaded, and the receiver may run in another process or not at all).

Whether it accepts instances is decided as the receiver decides it (radflow/ingest/receiver/
scp.py): an indexer alive, and room on the spool's disk by the same thresholds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from radflow.ingest.receiver.counters import DEAD, GONE, load_counters
from radflow.ingest.receiver.counters import indexer_health as health_of
from radflow.ingest.receiver.spool import count_waiting, disk_space, oldest_waiting, space_problem
from radflow.ingest.receiver.workers import spool_folders

COUNTED = ("received", "spooled", "indexed", "duplicates")


def spool_report(spool: Path, min_free_bytes: int, max_used_percent: float) -> dict[str, Any]:
    """Counters summed over the spool folders under ``spool``, the backlog and the age of its
    oldest instance, room on the disk, and each indexer's health."""
    now = time.time()
    folders = spool_folders(spool)
    saved = {folder: load_counters(folder / "stats.json") for folder in folders}
    indexers = {
        _name(spool, folder): health_of(counters, now)
        for folder, counters in saved.items()
        if counters is not None
    }
    oldest = [t for t in map(oldest_waiting, folders) if t is not None]
    disk = _existing(spool)
    free, used = disk_space(disk)
    problems = [_indexer_problem(indexers), space_problem(disk, min_free_bytes, max_used_percent)]
    reasons = [problem for problem in problems if problem is not None]
    return {
        **{name: sum(int((c or {}).get(name, 0)) for c in saved.values()) for name in COUNTED},
        "spool_waiting": sum(count_waiting(folder) for folder in folders),
        "oldest_waiting_seconds": round(now - min(oldest), 1) if oldest else None,
        "accepting": not reasons,
        "not_accepting_because": "; ".join(reasons) or None,
        "spool_free_bytes": free,
        "spool_used_percent": round(used, 1),
        "min_free_bytes": min_free_bytes,
        "max_used_percent": max_used_percent,
        "indexers": indexers,
        "indexing": _indexing(indexers),
    }


def _indexing(indexers: dict[str, dict[str, Any]]) -> str:
    """Whether indexing is "running" (an indexer alive), "failed" (one died or was killed) or
    "not running"."""
    if any(health["alive"] for health in indexers.values()):
        return "running"
    if any(health["state"] in (DEAD, GONE) for health in indexers.values()):
        return "failed"
    return "not running"


def _existing(folder: Path) -> Path:
    """``folder``, or its nearest parent that exists (no receiver has made the spool yet)."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def _name(spool: Path, folder: Path) -> str:
    return "." if folder == spool else folder.name


def _indexer_problem(indexers: dict[str, dict[str, Any]]) -> str | None:
    """Why no instance is acknowledged for want of an indexer, or None if one runs."""
    if any(health["alive"] for health in indexers.values()):
        return None
    dead = [(name, h) for name, h in indexers.items() if h["state"] in (DEAD, GONE)]
    if dead:
        name, health = dead[0]
        why = health["last_error"] if health["state"] == DEAD else "its process is gone"
        return (
            f"the indexer of spool folder {name} stopped ({why}); restart `radflow receive` "
            "(its log holds the traceback)"
        )
    return "no receiver runs on this spool: start `radflow receive`"
