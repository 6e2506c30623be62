"""What the two ways of sending results share: the object to send, and the two kinds of failure.

Every failure is one of two kinds, and :func:`radflow.outages.is_outage` tells them apart:

- :class:`DestinationUnavailable` (a ``ConnectionError``, so an outage): the destination cannot
  be reached, refuses or drops the association or request, does not answer in time, or is out
  of resources. The same object may go through later: it is retried with a backoff.
- :class:`ObjectRefused`: the destination took the request but refuses this object (no
  presentation context for its SOP class, a failure status about the data). Sending it again
  fails the same way: it is parked at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from radflow.errors import RadflowError

# Failure statuses that are about the destination's state, not the object: out of resources
# (PS3.4 B.2.3, 0xA7xx) and Orthanc's and others' catch-all "processing failure" (0x0110).
_TRANSIENT_FAILURES = (range(0xA700, 0xA800), range(0x0110, 0x0111))


class DestinationUnavailable(ConnectionError):
    """The destination could not take results now: retried later."""


class ObjectRefused(RadflowError):
    """The destination refused this object: sending it again would fail the same way."""


@dataclass(frozen=True)
class Outgoing:
    """One object to send, with the id the caller knows it by: its Part 10 bytes as stored,
    and the dataset read from them."""

    id: int
    data: bytes
    dataset: Dataset


def failure(code: int, why: str) -> Exception:
    """The failure a DICOM status ``code`` (C-STORE status, STOW-RS Failure Reason) stands for."""
    if any(code in codes for codes in _TRANSIENT_FAILURES):
        return DestinationUnavailable(why)
    return ObjectRefused(f"{why}; the object was refused, fix the cause and re-send")
