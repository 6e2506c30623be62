"""The one transient-error policy: outages are retried, data and programming errors are not."""

from __future__ import annotations

import errno

import pytest
import sqlalchemy.exc
from minio.error import S3Error

from flows.retry import transient_only
from radflow.outages import describe, is_outage


def _s3(code: str) -> S3Error:
    return S3Error(None, code, "message", "resource", "request-id", "host-id")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "exc",
    [
        sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection")),
        sqlalchemy.exc.InterfaceError("SELECT 1", {}, Exception("connection already closed")),
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EIO, "Input/output error"),
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        TimeoutError("timed out"),
        _s3("ServiceUnavailable"),
        _s3("NoSuchBucket"),
    ],
    ids=lambda e: describe(e)[:40],
)
def test_outages_are_retried(exc: BaseException) -> None:
    assert is_outage(exc)


@pytest.mark.parametrize(
    "exc",
    [
        # PostgreSQL refusing a value (NUL byte, integer out of range): the same every time.
        sqlalchemy.exc.DataError("INSERT", {}, Exception("value out of range for type integer")),
        sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("duplicate key")),
        sqlalchemy.exc.ProgrammingError("SELECT", {}, Exception("syntax error")),
        OverflowError("Python int too large to convert to C long"),
        RecursionError("maximum recursion depth exceeded"),
        TypeError("unsupported operand"),
        OSError(errno.ENAMETOOLONG, "File name too long"),
        FileNotFoundError(errno.ENOENT, "No such file or directory"),
        _s3("NoSuchKey"),
    ],
    ids=lambda e: describe(e)[:40],
)
def test_data_and_programming_errors_are_not(exc: BaseException) -> None:
    assert not is_outage(exc)


class _State:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def result(self) -> None:
        raise self.exc


def test_flow_task_retries_follow_the_policy() -> None:
    assert transient_only(None, None, _State(OSError(errno.EIO, "I/O error")))
    assert not transient_only(None, None, _State(KeyError("programming error")))
