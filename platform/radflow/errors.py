"""Errors Radflow raises on purpose. Each message says what was wrong and what to do about it."""

from __future__ import annotations


class RadflowError(Exception):
    """Base class for every error Radflow raises deliberately."""


class InvalidInstance(RadflowError):
    """A received file is not an instance Radflow can accept.

    ``reason`` is a short stable code (for counters, quarantine files and DICOM failure statuses);
    the message is for people.
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
    """An instance with this SOP Instance UID is already stored with different content."""

    def __init__(self, sop_instance_uid: str) -> None:
        super().__init__(
            "uid-conflict",
            f"SOP Instance UID {sop_instance_uid} is already stored with different content; "
            "the sender must assign a new SOP Instance UID to changed images",
        )


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
