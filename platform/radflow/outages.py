"""Outages: the one policy for what is worth retrying.

An outage is a failure of something Radflow depends on (the database server, the object store,
the disk, the network, the orchestration server) that says nothing about the data being
processed: the same work succeeds once the dependency is back, so it is retried with a backoff
and nothing is rejected or lost meanwhile. Everything else (a value the database refuses, a
file that cannot be parsed, a programming error) fails the same way every time: retrying only
hides it, so the work item is set aside with its reason and the next one goes on.

The receiver's indexer, the watch folder and the Prefect task retries (flows/retry.py) all ask
:func:`is_outage`; nothing else decides.
"""

from __future__ import annotations

import errno
import logging

import httpx
import sqlalchemy.exc
import urllib3.exceptions
from minio.error import MinioException, S3Error

# Errors of the operating system that come from the machine's state, not from one file: a full
# or read-only disk, an I/O error, permissions changed under a running service, a stale network
# mount, a process out of descriptors or memory.
_OUTAGE_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EIO,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ESTALE,
        errno.EAGAIN,
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOMEM,
        errno.EBUSY,
        errno.ENOTCONN,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.EHOSTDOWN,
    }
)

# S3 error codes that are about one request's object, not the service: everything else an S3
# server answers (unavailable, slow down, credentials, missing bucket) is an outage.
_S3_DATA_CODES = frozenset(
    {"NoSuchKey", "EntityTooLarge", "KeyTooLongError", "InvalidObjectName", "InvalidArgument"}
)

# SQLAlchemy's wrappers of DBAPI errors that mean the connection or the server, not the
# statement: a lost connection, a server restart, a lock wait given up, an exhausted pool.
# IntegrityError, DataError and ProgrammingError are about the statement and its values.
_DATABASE_OUTAGES: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.DisconnectionError,
    sqlalchemy.exc.TimeoutError,
)


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` is an outage (retry later) rather than a problem of the work itself."""
    if isinstance(exc, _DATABASE_OUTAGES):
        return True
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        return bool(exc.connection_invalidated)
    if isinstance(exc, S3Error):
        return exc.code not in _S3_DATA_CODES
    if isinstance(exc, MinioException | urllib3.exceptions.HTTPError | httpx.TransportError):
        return True
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _OUTAGE_ERRNOS
    return False


def describe(exc: BaseException) -> str:
    """One line for a log: the type and the first line of the message (never a traceback)."""
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class FailureLog:
    """Logs a long-lived loop's failures without flooding: an outage as one line each time it
    is seen, anything else with its traceback the first time and one line after that.

    A database down for 20 s must not leave 40 tracebacks in the receiver's log, and a bug hit
    on every tick must still show its traceback once.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._seen: set[tuple[str, str]] = set()

    def failed(self, what: str, exc: BaseException, *, then: str = "retrying") -> None:
        """Log that ``what`` failed with ``exc``; ``then`` says what happens next."""
        key = (type(exc).__name__, describe(exc))
        if is_outage(exc):
            self.logger.warning("%s failed (%s); %s", what, describe(exc), then)
        elif key not in self._seen:
            self._seen.add(key)
            self.logger.error("%s failed; %s", what, then, exc_info=exc)
        else:
            self.logger.error("%s failed again (%s); %s", what, describe(exc), then)
