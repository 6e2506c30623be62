"""The spool's files made ahead: taken instead of created on the data's path, never left over."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from radflow.receiver.spool import IncomingFiles, Spool


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
