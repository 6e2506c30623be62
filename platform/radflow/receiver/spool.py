"""The receiver's spool: acknowledged instances, durably on local disk until they are indexed.

Layout under the spool folder (``settings.spool``)::

    incoming/   datasets being received (streamed each into a file here) and empty files made
                ahead for the next ones; never acknowledged, so whatever a crash leaves here is
                deleted at the next start
    ready/      validated, fsynced, acknowledged instances waiting for the indexer
    rejected/   acknowledged instances the index refused later (a SOP Instance UID already stored
                with different content): kept, never deleted silently
    done/       indexed instances (their rows are committed), deleted lazily when the receiver is
                idle: freeing a file's blocks costs milliseconds on some disks, which would
                otherwise stall indexing and the journal commits the senders wait for
    stats.json  the receiver's counters (``radflow status``)
    .lock       held by the one receiver process that owns this spool

A file is in ``ready/`` only after its data and its directory entry are on disk, and the success
status goes to the sender only after that: nothing acknowledged is lost by a crash.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import threading
import uuid
from collections import deque
from pathlib import Path
from types import TracebackType

from radflow.durable import fsync_path
from radflow.errors import RadflowError

logger = logging.getLogger(__name__)


class SpoolBusy(RadflowError):
    def __init__(self, folder: Path) -> None:
        super().__init__(
            f"another radflow receiver already uses the spool {folder}; stop it, or give this "
            "one its own RADFLOW_SPOOL_DIR"
        )


# Empty files IncomingFiles keeps made ahead: one per association sending at once is plenty.
FILES_AHEAD = 4


class IncomingFiles:
    """Empty files in ``incoming/``, made ahead of the datasets that will fill them.

    Creating a file is a journalled change of its folder: 0.5-1 ms on the ext4 measured for
    benchmarks/ingest.py, against 10 µs to open one that exists. Made when a dataset starts,
    it holds up the DUL thread while the sender's data waits in the socket. So each
    association thread makes the next one right after sending a response (:meth:`prepare`),
    while the sender turns to its next instance and no fsync of that association runs, and the
    DUL thread only opens it (:meth:`take`).
    """

    def __init__(self, folder: Path, ahead: int = FILES_AHEAD) -> None:
        self.folder = folder
        self.ahead = ahead
        self._made: deque[Path] = deque()
        self._making = 0
        self._lock = threading.Lock()

    def take(self) -> Path:
        """An empty file for one dataset: one made ahead, else one made now."""
        with self._lock:
            if self._made:
                return self._made.popleft()
        return self._make()

    def prepare(self) -> None:
        """Make one file ahead, unless ``ahead`` are made or being made already.

        Never raises: when the disk is full, :meth:`take` fails instead, for the dataset that
        needs the file.
        """
        with self._lock:
            if len(self._made) + self._making >= self.ahead:
                return
            self._making += 1
        try:
            path = self._make()
        except OSError as exc:
            logger.debug("could not make a spool file ahead: %s", exc)
            return
        finally:
            with self._lock:
                self._making -= 1
        with self._lock:
            self._made.append(path)

    def discard(self) -> None:
        """Delete the files made ahead and never taken."""
        with self._lock:
            made, self._made = list(self._made), deque()
        for path in made:
            path.unlink(missing_ok=True)

    def _make(self) -> Path:
        path = self.folder / f"{uuid.uuid4().hex}.dcm"
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        return path


class Spool:
    """One spool folder, owned (locked) by one receiver process while it is open."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / "incoming"
        self.ready = root / "ready"
        self.rejected = root / "rejected"
        self.done = root / "done"
        self.stats_path = root / "stats.json"
        self._lock_fd: int | None = None
        self._ready_fd: int | None = None
        self.incoming_files = IncomingFiles(self.incoming)

    def open(self) -> Spool:
        """Lock the spool for this process and clear what an interrupted receive left behind."""
        for folder in (self.incoming, self.ready, self.rejected, self.done):
            folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolBusy(self.root) from None
        self._lock_fd = fd
        self._ready_fd = os.open(self.ready, os.O_RDONLY | os.O_DIRECTORY)
        # Partial datasets of associations cut by a crash: the sender never got a success
        # status for them and sends them again.
        for leftover in self.incoming.iterdir():
            leftover.unlink(missing_ok=True)
        for _ in range(self.incoming_files.ahead):
            self.incoming_files.prepare()
        return self

    def close(self) -> None:
        self.incoming_files.discard()
        for fd in (self._ready_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._ready_fd = self._lock_fd = None

    def __enter__(self) -> Spool:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def sync(self, received: Path) -> None:
        """Force a fully received file's data and inode to disk (before :meth:`accept`).

        The fsync waits for the disk without holding the GIL: the receiver checks the file's
        header in another thread meanwhile (radflow/receiver/scp.py).
        """
        fsync_path(received)

    def accept(self, received: Path, sop_instance_uid: str) -> Path:
        """Make a fully received, synced file durable in ``ready/``; return its spool path.

        The rename into ``ready/`` comes after :meth:`sync` and the directory's fsync makes the
        new name durable, so the sender's success status always follows both. The name keeps
        the (validated) UID for people and a random part so a re-sent instance never replaces
        one still waiting.
        """
        target = self.ready / f"{sop_instance_uid}.{uuid.uuid4().hex[:12]}.dcm"
        try:
            os.rename(received, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # The temporary file is on another filesystem (temp dir not pointed at incoming/).
            shutil.copyfile(received, target)
            fsync_path(target)
        assert self._ready_fd is not None, "Spool.open() first"
        os.fsync(self._ready_fd)
        return target

    def waiting(self, limit: int | None = None) -> list[Path]:
        """Spooled instances not yet indexed, oldest name first (at most ``limit``)."""
        names = sorted(
            entry.name
            for entry in os.scandir(self.ready)
            if entry.name.endswith(".dcm") and entry.is_file()
        )
        return [self.ready / name for name in names[:limit]]

    def count(self) -> int:
        return count_waiting(self.root)

    def consume(self, path: Path) -> None:
        """Move an instance whose index row is committed out of ``ready/`` (a cheap rename).

        Not fsynced: if a crash undoes the rename, the instance is indexed again as a duplicate
        (same UID and content), which the index recognises and skips.
        """
        os.replace(path, self.done / path.name)

    def reap(self, limit: int) -> int:
        """Delete up to ``limit`` consumed instances; how many were deleted."""
        with os.scandir(self.done) as entries:
            names = [entry.name for _, entry in zip(range(limit), entries, strict=False)]
        for name in names:
            (self.done / name).unlink(missing_ok=True)
        return len(names)

    def set_aside(self, path: Path) -> Path:
        """Move an acknowledged instance the index refused to ``rejected/``."""
        target = self.rejected / path.name
        os.replace(path, target)
        return target


def count_waiting(root: Path) -> int:
    """Instances in the spool at ``root`` still waiting to be indexed (0 if there is none)."""
    try:
        return sum(1 for entry in os.scandir(root / "ready") if entry.name.endswith(".dcm"))
    except FileNotFoundError:
        return 0
