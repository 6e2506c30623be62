"""The receiver's spool: acknowledged instances, durably on local disk until they are indexed.

Layout under the spool folder (``settings.spool``)::

    incoming/   datasets being received (streamed each into a file here) and empty files made
                ahead for the next ones; a refused dataset is deleted before its failure status
                is sent, one cut by an aborted or broken association when the association ends
                (:meth:`Spool.remove_partial`); after a crash, what was received whole moves to
                ready/ and the rest is deleted
    ready/      fsynced, acknowledged instances waiting for the indexer
    rejected/   acknowledged instances the index refused later (a SOP Instance UID already stored
                with different content, a value the database refuses, a file whose indexing
                fails unexpectedly: each with a Rejection row): kept, never deleted silently
    done/       indexed instances (their rows are committed), deleted lazily when the receiver is
                idle: freeing a file's blocks costs milliseconds on some disks, which would
                otherwise stall indexing and the journal commits the senders wait for
    stats.json  the receiver's counters and its indexer's health (``radflow status``)
    .lock       held by the one receiver process that owns this spool

The sender gets the success status only once the instance is on disk, with one journal commit
(one fsync) per instance:

1. The receiver streams the instance into an empty file made ahead in ``incoming/``, whose name
   is already on disk (:class:`IncomingFiles` fsyncs the folder before handing it out).
2. Fully received, the file gets an extended attribute holding its size (:data:`COMPLETE`),
   and one fsync puts its data, its size and that attribute on disk together.
3. It is renamed into ``ready/``, without an fsync, and the sender gets its status.

After a crash, :meth:`Spool.open` moves every file of ``incoming/`` whose attribute matches its
size to ``ready/`` (acknowledged, or received whole just before the crash: a duplicate the index
recognises if it is sent again; or refused just before it, since the mark goes on while the
header is checked: the indexer refuses it again, with its reason, and keeps it in ``rejected/``)
and deletes the others (partial, never acknowledged). Where the filesystem keeps no extended
attributes, or for a file pynetdicom made itself, the rename comes before the status instead and
``ready/`` is fsynced: two commits.

A full disk never takes an association down: below ``RADFLOW_RECEIVER_MIN_FREE_BYTES`` free (or
above ``RADFLOW_RECEIVER_MAX_USED_PERCENT`` used) the receiver refuses new associations and
instances (:func:`space_problem`), and a write that fails anyway (ENOSPC) marks its dataset
spoiled (:meth:`IncomingFiles.spoil`): the sender gets 0xA701 once the dataset has arrived.
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

from radflow.errors import RadflowError
from radflow.store.durable import fsync_path

logger = logging.getLogger(__name__)


class SpoolBusy(RadflowError):
    def __init__(self, folder: Path) -> None:
        super().__init__(
            f"another radflow receiver already uses the spool {folder}; stop it, or give this "
            "one its own RADFLOW_SPOOL_DIR"
        )


# Empty files IncomingFiles keeps made ahead: one per association sending at once is plenty.
FILES_AHEAD = 8
# New files IncomingFiles makes before it fsyncs their folder.
NAMES_PER_FSYNC = 4
_MADE_AHEAD = "ahead-"
# The extended attribute that marks a file of incoming/ as received whole: its size in bytes.
COMPLETE = "user.radflow.received-bytes"


class IncomingFiles:
    """Empty files in ``incoming/``, made ahead of the datasets that will fill them.

    Creating a file is a journalled change of its folder: 0.5-1 ms on the ext4 measured for
    benchmarks/ingest.py, against 10 µs to open one that exists, and its name must be on disk
    before the file holds an acknowledged instance. Made when a dataset starts, it would hold
    up the DUL thread while the sender's data waits in the socket, and cost a second fsync per
    instance. So each association thread makes the next one right after sending a response
    (:meth:`prepare`), while the sender turns to its next instance and no fsync of that
    association runs, and fsyncs the folder once for several; the DUL thread only opens one
    whose name is on disk (:meth:`take`).
    """

    def __init__(
        self, folder: Path, ahead: int = FILES_AHEAD, batch: int = NAMES_PER_FSYNC
    ) -> None:
        self.folder = folder
        self.ahead = ahead
        self.batch = batch
        self._made: deque[Path] = deque()  # names on disk: ready to hand out
        self._unsynced: list[Path] = []  # made, waiting for the folder's next fsync
        self._making = self._syncing = 0  # files being made, names being fsynced
        self._spoiled: dict[Path, OSError] = {}  # datasets a write failed for, until answered
        self._lock = threading.Lock()

    def take(self) -> Path:
        """An empty file for one dataset, its name on disk: one made ahead, else one made now."""
        with self._lock:
            if self._made:
                return self._made.popleft()
        path = self._create()
        fsync_path(self.folder)
        return path

    def prepare(self) -> None:
        """Make one file ahead, unless ``ahead`` are made or being made already.

        The folder is fsynced once ``batch`` new files wait for it (or when none is left to
        hand out): one fsync puts several names on disk. Never raises: when the disk is full,
        :meth:`take` fails instead, for the dataset that needs the file.
        """
        with self._lock:
            if len(self._made) + len(self._unsynced) + self._making + self._syncing >= self.ahead:
                return
            self._making += 1
        try:
            path: Path | None = self._create()
        except OSError as exc:
            logger.debug("could not make a spool file ahead: %s", exc)
            path = None
        with self._lock:
            self._making -= 1
            if path is not None:
                self._unsynced.append(path)
            if not self._unsynced or (len(self._unsynced) < self.batch and self._made):
                return
            names, self._unsynced = self._unsynced, []
            self._syncing += len(names)
        try:
            fsync_path(self.folder)
            synced = True
        except OSError as exc:
            logger.debug("could not fsync %s: %s", self.folder, exc)
            synced = False
        with self._lock:
            self._syncing -= len(names)
            (self._made if synced else self._unsynced).extend(names)

    def discard(self) -> None:
        """Delete the files made ahead and never taken."""
        with self._lock:
            made, self._made, self._unsynced = [*self._made, *self._unsynced], deque(), []
        for path in made:
            path.unlink(missing_ok=True)

    def spoil(self, path: Path, error: OSError) -> None:
        """A write of the dataset streamed into ``path`` failed (the disk is full): the rest of it
        is read and dropped, and its C-STORE is refused (:meth:`spoiled`), not the association."""
        with self._lock:
            self._spoiled[path] = error

    def spoiled(self, path: Path) -> OSError | None:
        """Why the dataset of ``path`` could not be written, if it could not (asked once)."""
        with self._lock:
            return self._spoiled.pop(path, None)

    def made_here(self, path: Path) -> bool:
        """Whether ``path`` is one of these files (its name was on disk before it was filled)."""
        return path.parent == self.folder and path.name.startswith(_MADE_AHEAD)

    def _create(self) -> Path:
        path = self.folder / f"{_MADE_AHEAD}{uuid.uuid4().hex}.dcm"
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
        self._marks = True  # until the filesystem refuses an extended attribute

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
        for leftover in self.incoming.iterdir():
            if _received_whole(leftover):
                os.rename(leftover, self.ready / leftover.name)
            else:
                # A dataset cut by a crash, or a file made ahead: never acknowledged (the
                # sender sends the instance again).
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

    def sync(self, received: Path) -> bool:
        """Force a fully received file's data and inode to disk (before :meth:`accept`).

        A file made ahead first gets the :data:`COMPLETE` mark, which the same fsync puts on disk;
        True if it did (one commit: see the module docstring). The fsync waits for the disk
        without holding the GIL: the receiver checks the file's header in another thread
        meanwhile (radflow/receiver/scp.py).
        """
        marked = self._marks and self.incoming_files.made_here(received)
        if marked:
            marked = self._mark(received)
        fsync_path(received)
        return marked

    def accept(self, received: Path, sop_instance_uid: str, marked: bool) -> Path:
        """Move a fully received, synced file into ``ready/``; return its spool path.

        ``marked`` (from :meth:`sync`): the file is on disk, name and :data:`COMPLETE` mark
        included, and the rename is only bookkeeping (undone by a crash, :meth:`open` redoes it).
        Otherwise the rename must be on disk before the sender's status, and ``ready/`` is
        fsynced. The name keeps the (validated) UID for people and a random part so a re-sent
        instance never replaces one still waiting.
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
            marked = False
        if not marked:
            assert self._ready_fd is not None, "Spool.open() first"
            os.fsync(self._ready_fd)
        return target

    def _mark(self, received: Path) -> bool:
        try:
            os.setxattr(received, COMPLETE, str(received.stat().st_size).encode("ascii"))
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            self._marks = False
            logger.warning(
                "the spool folder %s keeps no extended attributes: each instance now costs two "
                "fsyncs (put RADFLOW_SPOOL_DIR on ext4, XFS or btrfs for one)",
                self.root,
            )
            return False
        return True

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

    def remove_partial(self) -> int:
        """Delete the datasets of ``incoming/`` no association is receiving any more; how many.

        An association that ends before its dataset does (A-ABORT, a reset connection, a
        timeout, a PDU refused) leaves a partial file that nobody will finish. Whatever a
        receive still holds is open in this process (pynetdicom's file or the fast path's, from
        its first byte to its rename into ``ready/``); files made ahead are empty until taken.
        Files nobody holds are leftovers.
        """
        names = [entry.name for entry in os.scandir(self.incoming) if entry.is_file()]
        # Sizes first, open files after: a file made ahead that another association takes and
        # writes to meanwhile is empty here, or open by the time the open files are listed.
        candidates = [
            self.incoming / n for n in names if not self._waiting_ahead(self.incoming / n)
        ]
        held = _open_in_this_process(self.incoming)
        if held is None:
            return 0  # no /proc: cannot tell; a restart clears them (open())
        removed = 0
        for path in candidates:
            if str(path) in held:
                continue
            path.unlink(missing_ok=True)
            removed += 1
        if removed:
            logger.info("removed %d partly received datasets from %s", removed, self.incoming)
        return removed

    def _waiting_ahead(self, path: Path) -> bool:
        try:
            return self.incoming_files.made_here(path) and path.stat().st_size == 0
        except FileNotFoundError:
            return True  # gone meanwhile: nothing to remove


def _open_in_this_process(folder: Path) -> set[str] | None:
    """The paths under ``folder`` that file descriptors of this process hold (None: unknown)."""
    prefix = f"{folder}{os.sep}"
    try:
        descriptors = os.listdir("/proc/self/fd")
    except OSError:
        return None
    held = set()
    for fd in descriptors:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (or the listing's own descriptor)
        if target.startswith(prefix):
            held.add(target)
    return held


def disk_space(root: Path) -> tuple[int, float]:
    """Bytes free (for an unprivileged process) and the percentage used, as ``df`` shows them,
    on the filesystem of ``root``."""
    stats = os.statvfs(root)
    used = stats.f_blocks - stats.f_bfree
    usable = used + stats.f_bavail
    return stats.f_bavail * stats.f_frsize, 100.0 * used / usable if usable else 0.0


def space_problem(root: Path, min_free_bytes: int, max_used_percent: float) -> str | None:
    """Why the spool at ``root`` has no room for more instances, or None if it has."""
    free, used = disk_space(root)
    if free < min_free_bytes:
        return (
            f"{free / 1024**2:.0f} MiB free on the spool's disk, below "
            f"RADFLOW_RECEIVER_MIN_FREE_BYTES ({min_free_bytes / 1024**2:.0f} MiB)"
        )
    if used > max_used_percent:
        return (
            f"the spool's disk is {used:.1f}% full, above RADFLOW_RECEIVER_MAX_USED_PERCENT "
            f"({max_used_percent:g}%)"
        )
    return None


def _received_whole(path: Path) -> bool:
    """Whether a file of ``incoming/`` bears the :data:`COMPLETE` mark and has that size.

    The mark and the size reach the disk in the same fsync; if a crash came first, either the
    mark is missing or (the mark committed before the data was written back) the size on disk
    is short: filesystems that order data before metadata (ext4's default ``data=ordered``,
    XFS, btrfs) never grow a file's size on disk past the data written.
    """
    try:
        return int(os.getxattr(path, COMPLETE)) == path.stat().st_size
    except (OSError, ValueError):
        return False


def count_waiting(root: Path) -> int:
    """Instances in the spool at ``root`` still waiting to be indexed (0 if there is none)."""
    try:
        return sum(1 for entry in os.scandir(root / "ready") if entry.name.endswith(".dcm"))
    except (FileNotFoundError, NotADirectoryError):  # none, or not a spool
        return 0


def oldest_waiting(root: Path) -> float | None:
    """When the oldest instance still waiting in the spool at ``root`` arrived (its mtime: the
    last byte received); None if none waits."""
    oldest: float | None = None
    try:
        entries = list(os.scandir(root / "ready"))
    except (FileNotFoundError, NotADirectoryError):  # none, or not a spool
        return None
    for entry in entries:
        if not entry.name.endswith(".dcm"):
            continue
        try:
            mtime = entry.stat().st_mtime
        except FileNotFoundError:
            continue  # indexed meanwhile
        oldest = mtime if oldest is None else min(oldest, mtime)
    return oldest
