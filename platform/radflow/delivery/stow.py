"""Sending results to a destination by DICOMweb STOW-RS (PS3.18 10.5): one multipart request
per batch, each object's outcome read from the response; the kinds of failure are those of
:mod:`radflow.delivery.outgoing`.

- 200 / 202: stored, except the objects the response lists as failed;
- 400 / 409 / 413 / 415 (about the request's content): refused, except the objects the
  response lists as stored;
- any other answer (authentication, a wrong URL, a busy or failing server) and no answer at
  all: the destination is unavailable, retried with a backoff.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence

import httpx
from pydicom.dataset import Dataset

from radflow.delivery.outgoing import DestinationUnavailable, ObjectRefused, Outgoing, failure
from radflow.ingest.routing import Destination
from radflow.outages import describe

_STORED = frozenset({200, 202})
_REFUSED = frozenset({400, 409, 413, 415})


def send(
    destination: Destination, items: Sequence[Outgoing], *, timeout: float
) -> dict[int, Exception | None]:
    """POST ``items`` to the destination's STOW-RS URL in one request: each id's error, or None
    when it was stored. Raises DestinationUnavailable when the request gets no usable answer."""
    if destination.stow_url is None:
        raise ValueError(f"destination {destination.name} has no stow_url")
    boundary = uuid.uuid4().hex
    body = b"".join(
        b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), item.data)
        for item in items
    )
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    try:
        response = httpx.post(
            destination.stow_url,
            content=body + b"--%s--\r\n" % boundary.encode(),
            headers=headers,
            timeout=timeout,
        )
    except httpx.TransportError as exc:
        raise DestinationUnavailable(
            f"cannot reach {destination.describe()}: {describe(exc)}"
        ) from exc
    return outcomes(destination, items, response)


def outcomes(
    destination: Destination, items: Sequence[Outgoing], response: httpx.Response
) -> dict[int, Exception | None]:
    """Each item's outcome as the destination's STOW-RS ``response`` tells it."""
    code = response.status_code
    answered = f"{destination.describe()} answered HTTP {code} {response.reason_phrase}"
    if code not in _STORED | _REFUSED:
        raise DestinationUnavailable(
            f"{answered}; check the URL, that it accepts STOW-RS from Radflow, and the server"
        )
    stored, failed = _listed(response)
    found: dict[int, Exception | None] = {}
    for item in items:
        uid = str(item.dataset.SOPInstanceUID)
        if uid in failed:
            found[item.id] = failure(failed[uid], f"{answered}, failure reason 0x{failed[uid]:04X}")
        elif code in _STORED or uid in stored:
            found[item.id] = None
        else:
            found[item.id] = ObjectRefused(
                f"{answered} and did not store the object; fix the cause and re-send"
            )
    return found


def _listed(response: httpx.Response) -> tuple[set[str], dict[str, int]]:
    """SOP Instance UIDs the response lists as stored, and as failed (with their reason)."""
    try:
        content = json.loads(response.content or b"null")
        answer = Dataset.from_json(content) if isinstance(content, dict) else Dataset()
    except (TypeError, ValueError, KeyError):  # not a DICOM JSON answer: nothing listed
        answer = Dataset()
    stored = {
        str(item.get("ReferencedSOPInstanceUID"))
        for item in answer.get("ReferencedSOPSequence", [])
    }
    failed = {
        str(item.get("ReferencedSOPInstanceUID")): int(item.get("FailureReason") or 0xC000)
        for item in answer.get("FailedSOPSequence", [])
    }
    return stored, failed
