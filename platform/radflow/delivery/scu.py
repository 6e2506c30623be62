"""Sending results to a destination by C-STORE (pynetdicom's public SCU API); the kinds of
failure are those of :mod:`radflow.delivery.outgoing`."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.status import code_to_category

from radflow.delivery.outgoing import DestinationUnavailable, ObjectRefused, Outgoing, failure
from radflow.ingest.routing import Destination

logger = logging.getLogger(__name__)


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
    called, host, port = destination.c_store_address()
    ae = AE(ae_title=destination.calling_ae_title or calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class in sorted({str(item.dataset.SOPClassUID) for item in items}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(host, port, ae_title=called)
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
    return failure(code, why)


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
