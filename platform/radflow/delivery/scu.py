"""Sending results to a destination by C-STORE (pynetdicom's public SCU API).

Every failure is one of two kinds, and :func:`radflow.outages.is_outage` tells them apart:

- :class:`DestinationUnavailable` (a ``ConnectionError``, so an outage): the destination cannot
  be reached, refuses or drops the association, does not answer in time, or is out of
  resources. The same object may go through later: it is retried with a backoff.
- :class:`ObjectRefused`: the destination accepted the association but refuses this object
  (no presentation context for its SOP class, a failure status about the data). Sending it
  again fails the same way: it is parked at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.status import code_to_category

from radflow.errors import RadflowError
from radflow.ingest.routing import Destination

logger = logging.getLogger(__name__)

# Failure statuses that are about the destination's state, not the object: out of resources
# (PS3.4 B.2.3, 0xA7xx) and Orthanc's and others' catch-all "processing failure".
_TRANSIENT_FAILURES = (range(0xA700, 0xA800), range(0x0110, 0x0111))


class DestinationUnavailable(ConnectionError):
    """The destination could not take results now: retried later."""


class ObjectRefused(RadflowError):
    """The destination refused this object: sending it again would fail the same way."""


@dataclass(frozen=True)
class Outgoing:
    """One object to send, with the id the caller knows it by."""

    id: int
    dataset: Dataset


def send(
    destination: Destination,
    items: Sequence[Outgoing],
    *,
    calling_ae_title: str,
    timeout: float,
) -> dict[int, Exception | None]:
    """C-STORE ``items`` to ``destination`` over one association: each id's error, or None
    when it was stored (a warning status counts as stored).

    Raises DestinationUnavailable when no association can be made; an association lost on the
    way fails the items not yet sent with DestinationUnavailable.
    """
    ae = AE(ae_title=destination.calling_ae_title or calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class in sorted({str(item.dataset.SOPClassUID) for item in items}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise DestinationUnavailable(_not_associated(assoc, destination, ae.ae_title))
    outcomes: dict[int, Exception | None] = {}
    try:
        for item in items:
            if not assoc.is_established:
                outcomes[item.id] = DestinationUnavailable(
                    f"{destination.describe()} ended the association before this object was sent"
                )
                continue
            outcomes[item.id] = _store(assoc, item.dataset, destination)
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def _store(assoc: Association, dataset: Dataset, destination: Destination) -> Exception | None:
    sop_class = dataset.SOPClassUID
    try:
        status = assoc.send_c_store(dataset)
    except ValueError as exc:  # no accepted presentation context, or not encodable
        return ObjectRefused(
            f"{destination.describe()} does not accept {sop_class.name} objects ({exc}); "
            "configure it to store them, then re-send"
        )
    if "Status" not in status:  # no response: timed out or the association was lost
        return DestinationUnavailable(
            f"{destination.describe()} did not answer the C-STORE of a {sop_class.name}"
        )
    code = int(status.Status)
    category = code_to_category(code)
    if category in ("Success", "Warning"):
        if category == "Warning":
            logger.warning("%s stored with warning 0x%04X", destination.name, code)
        return None
    comment = str(status.get("ErrorComment", "")).strip()
    why = f"{destination.describe()} answered C-STORE status 0x{code:04X} ({category})"
    why += f": {comment}" if comment else ""
    if any(code in codes for codes in _TRANSIENT_FAILURES):
        return DestinationUnavailable(why)
    return ObjectRefused(f"{why}; the object was refused, fix the cause and re-send")


def _not_associated(assoc: Association, destination: Destination, calling: str) -> str:
    response = assoc.acceptor.primitive
    if assoc.is_rejected and response is not None:
        return (
            f"{destination.describe()} rejected the association ({response.result_str}, "
            f"{response.source_str}: {response.reason_str}); check that it knows the calling "
            f"AE title {calling} and is called {destination.ae_title}"
        )
    # pynetdicom reports a refused or failed connection as an aborted association too.
    return (
        f"cannot associate with {destination.describe()}: not reachable, connection refused, "
        "aborted or no answer in time"
    )
