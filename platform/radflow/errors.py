"""Errors Radflow raises on purpose. Each message says what was wrong and what to do about it."""

from __future__ import annotations


class RadflowError(Exception):
    """Base class for every error Radflow raises deliberately."""


class InvalidInstance(RadflowError):
    """A received file is not an instance Radflow can accept.

    ``reason`` is a short stable code (for counters, quarantine files and DICOM failure statuses);
    the message is for people. The codes: ``not-dicom``, ``unreadable``, ``truncated``,
    ``missing-uid``, ``invalid-uid``, ``no-pixel-data``, ``bad-dimensions``, ``too-large``,
    ``unsupported-transfer-syntax`` (:mod:`radflow.dicom.instance`); ``uid-conflict``
    (:class:`ConflictingInstance`); ``unprocessable`` (:class:`Unprocessable`); for the watch
    folder ``bad-archive``, ``unsafe-archive``, ``archive-too-large`` and ``symlink``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# Reasons for refusing an instance whose header and encoding contradict each other (issue 17),
# raised by radflow.dicom.instance.read_header; each has its status in
# radflow.ingest.receiver.statuses.
PIXEL_DATA_MISMATCH = "pixel-data-mismatch"
TOO_DEEPLY_NESTED = "too-deeply-nested"


class ConflictingInstance(InvalidInstance):
    """An instance with this SOP Instance UID is already stored with other pixels or identity.

    Another encoding of the same image (another transfer syntax, other file meta) is not a
    conflict but a duplicate; see :mod:`radflow.ingest.index`.
    """

    def __init__(self, sop_instance_uid: str, stored: str, received: str, difference: str) -> None:
        super().__init__(
            "uid-conflict",
            f"SOP Instance UID {sop_instance_uid} is already stored (SHA-256 {stored}) and this "
            f"file (SHA-256 {received}) {difference}; the stored copy is kept. The sender must "
            "assign a new SOP Instance UID to changed images",
        )


class Unprocessable(InvalidInstance):
    """Processing a file failed in a way Radflow did not foresee (not an outage).

    Such a failure repeats on every attempt, so the file is set aside like a refused one and
    the next goes on; the traceback is logged once (:func:`radflow.ingest.index.refusal`).
    """

    def __init__(self, message: str) -> None:
        super().__init__("unprocessable", message)


# Not a refusal: the instance is indexed, without a value its column cannot hold (recorded as a
# Rejection row of source ``warning``, see radflow.ingest.index).
VALUE_DROPPED = "value-dropped"


class NotAVolume(RadflowError, ValueError):
    """A series is not one volume (or, for a sequence task, one ordered stack of images).

    Shown on the study like "no applicable model" (the task does not apply to it), never a
    failure. ``reason`` is a stable code (radflow.dicom.geometry): ``no-instances``,
    ``too-few-slices``, ``multi-frame-series``, ``localizer``, ``too-many-voxels``,
    ``mixed-sizes``, ``no-geometry``, ``mixed-orientations``, ``duplicate-positions``,
    ``tilted-stack``, ``missing-slices``, ``non-uniform-spacing``; ``not-a-volume`` for what
    only loading the pixels shows (radflow.dicom.volume).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class NoChampion(RadflowError):
    def __init__(self, task: str) -> None:
        super().__init__(
            f"task {task!r} has no champion model yet: label studies and run `radflow train "
            f"--task {task}` first"
        )


class NotEnoughLabels(RadflowError):
    pass


class UnknownTask(RadflowError):
    def __init__(self, task: str, known: list[str]) -> None:
        super().__init__(f"unknown task {task!r}; known tasks: {', '.join(known)}")


class SchemaNotCurrent(RadflowError):
    """The database's schema is not the one this Radflow was built for."""

    def __init__(self, current: str, expected: str) -> None:
        super().__init__(
            f"the database schema is at revision {current}, this Radflow needs {expected}: "
            "run `radflow migrate` (with the same RADFLOW_DATABASE_URL) once, then start again"
        )
