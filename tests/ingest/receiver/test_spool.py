"""The spool: files made ahead, one fsync per instance, and what a restart keeps."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import BinaryIO

import pytest

from radflow.ingest.receiver import spool as spool_module
from radflow.ingest.receiver.spool import COMPLETE, IncomingFiles, Spool


def test_a_file_made_ahead_is_taken_before_a_new_one_is_made(tmp_path: Path) -> None:
    files = IncomingFiles(tmp_path, ahead=2)
    files.prepare()
    (made,) = tmp_path.iterdir()

    assert files.take() == made
    assert made.stat().st_size == 0
    fresh = files.take()  # none waiting: made on the spot
    assert fresh != made and fresh.exists()


def test_prepare_keeps_at_most_ahead_files_waiting(tmp_path: Path) -> None:
    files = IncomingFiles(tmp_path, ahead=3)
    threads = [threading.Thread(target=files.prepare) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(list(tmp_path.iterdir())) == 3

    files.take()
    files.prepare()
    files.prepare()
    assert len(list(tmp_path.iterdir())) == 4  # the taken one (in use) and 3 waiting


def test_prepare_on_a_full_or_missing_disk_leaves_the_error_to_take(tmp_path: Path) -> None:
    files = IncomingFiles(tmp_path / "gone")
    files.prepare()  # must not raise: it runs after a response, in pynetdicom's thread
    with pytest.raises(FileNotFoundError):
        files.take()


def test_a_closed_spool_leaves_no_file_made_ahead(tmp_path: Path) -> None:
    spool = Spool(tmp_path).open()
    assert len(list(spool.incoming.iterdir())) == spool.incoming_files.ahead
    in_use = spool.incoming_files.take()

    spool.close()

    assert list(spool.incoming.iterdir()) == [in_use]  # a dataset being received is its owner's


def _count_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd) or real_fsync(fd))
    return fsyncs


def test_names_made_ahead_reach_the_disk_a_batch_per_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = _count_fsyncs(monkeypatch)
    files = IncomingFiles(tmp_path, ahead=8, batch=4)
    for _ in range(8):
        files.prepare()

    # The first file at once (none to hand out yet), then four with one fsync; three wait.
    assert len(fsyncs) == 2
    handed = {files.take() for _ in range(5)}
    assert len(handed) == 5 and len(fsyncs) == 2  # all five were on disk already


def _received(spool: Spool, data: bytes) -> Path:
    """A file made ahead, filled as the receiver fills one."""
    path = spool.incoming_files.take()
    path.write_bytes(data)
    return path


def test_a_received_file_made_ahead_is_marked_and_moved_with_one_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = _count_fsyncs(monkeypatch)
    with Spool(tmp_path) as spool:
        path = _received(spool, b"DICM" * 1000)
        fsyncs.clear()

        assert spool.sync(path) is True
        assert os.getxattr(path, COMPLETE) == b"4000"
        spooled = spool.accept(path, "1.2.3", marked=True)

        assert len(fsyncs) == 1
        assert spooled.parent == spool.ready and spooled.read_bytes() == b"DICM" * 1000


def test_a_file_not_made_ahead_is_not_marked(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        path = spool.incoming / "tmp1234"  # as pynetdicom's own C-STORE path names them
        path.write_bytes(b"data")

        assert spool.sync(path) is False
        with pytest.raises(OSError):
            os.getxattr(path, COMPLETE)


def test_after_a_crash_only_files_received_whole_are_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path).open()
    whole = _received(spool, b"x" * 5000)
    spool.sync(whole)  # then a crash, before the rename into ready/
    cut = _received(spool, b"y" * 5000)
    spool.sync(cut)
    os.truncate(cut, 4096)  # its mark reached the disk, not all of its data
    partial = _received(spool, b"z" * 100)  # a crash while it arrived: no mark
    spool.close()

    spool = Spool(tmp_path).open()  # the restart
    try:
        assert [p.read_bytes() for p in spool.waiting()] == [b"x" * 5000]
        left = set(spool.incoming.iterdir())
        assert not left & {whole, cut, partial}
        assert all(p.stat().st_size == 0 for p in left)  # only the new files made ahead
    finally:
        spool.close()


def test_without_extended_attributes_each_instance_is_fsynced_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem without user xattrs (some NFS, old tmpfs), which this machine lacks: the
    refusal is simulated. The spool falls back to fsyncing ready/ after the rename."""

    def refuse(*args: object) -> None:
        raise OSError(errno.ENOTSUP, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", refuse)
    fsyncs = _count_fsyncs(monkeypatch)
    with Spool(tmp_path) as spool:
        path = _received(spool, b"data")
        fsyncs.clear()

        marked = spool.sync(path)
        spool.accept(path, "1.2.3", marked)

        assert marked is False
        assert len(fsyncs) == 2  # the file, then ready/
        assert spool.sync(_received(spool, b"more")) is False  # not tried again


def test_removing_partial_datasets_never_takes_one_being_received(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An association that ends removes what nobody holds open in incoming/ while other
    associations receive. Here another one takes the file made ahead, opens it and writes its
    dataset at the worst moment: after the remover listed the folder and the files this process
    holds open. The file is theirs and stays. (Found by the receiver's fuzz
    test: a valid instance's file vanished before its fsync; the sender got 0xC005.)"""
    spool = Spool(tmp_path / "spool").open()
    opened: list[BinaryIO] = []
    find_held = spool_module._open_in_this_process

    def another_association_receives(folder: Path) -> set[str] | None:
        held = find_held(folder)
        if not opened:  # just after the remover saw which files are open
            received = open(spool.incoming_files.take(), "r+b", buffering=0)  # noqa: SIM115
            received.write(b"a dataset")
            opened.append(received)
        return held

    monkeypatch.setattr(spool_module, "_open_in_this_process", another_association_receives)
    try:
        assert spool.remove_partial() == 0
        (received,) = opened
        assert Path(received.name).exists()
        assert spool.sync(Path(received.name)) is True
        received.close()
    finally:
        spool.close()
