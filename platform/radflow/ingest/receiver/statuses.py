"""C-STORE response statuses: one specific failure status for each reason an instance is refused.

The reason codes are those of :class:`radflow.errors.InvalidInstance` (raised by
:func:`radflow.dicom.instance.read_header`). The status classes follow DICOM PS3.4 Annex B.2.3:

====================================  ========  ==========================================
reason                                status    class
====================================  ========  ==========================================
missing-uid                           0xA900    Error: data set does not match SOP class
invalid-uid                           0xA901    Error: data set does not match SOP class
no-pixel-data                         0xA902    Error: data set does not match SOP class
bad-dimensions                        0xA903    Error: data set does not match SOP class
pixel-data-mismatch                   0xA904    Error: data set does not match SOP class
too-large                             0xA700    Refused: out of resources
out-of-resources (spool disk)         0xA701    Refused: out of resources
not-dicom                             0xC000    Error: cannot understand
unreadable                            0xC001    Error: cannot understand
truncated                             0xC002    Error: cannot understand
unsupported-transfer-syntax           0xC003    Error: cannot understand
too-deeply-nested                     0xC004    Error: cannot understand
any other reason                      0xC0FF    Error: cannot understand
====================================  ========  ==========================================

Senders (and their logs) see which rule an instance broke; ``radflow status`` counts the same
reasons. ``uid-conflict`` has no status: it is found only when indexing, after the success status
(the instance is then kept in ``spool/rejected`` and recorded as a rejection).
"""

from __future__ import annotations

SUCCESS = 0x0000
OUT_OF_RESOURCES = "out-of-resources"

FAILURE_STATUS: dict[str, int] = {
    "missing-uid": 0xA900,
    "invalid-uid": 0xA901,
    "no-pixel-data": 0xA902,
    "bad-dimensions": 0xA903,
    "pixel-data-mismatch": 0xA904,
    "too-large": 0xA700,
    OUT_OF_RESOURCES: 0xA701,
    "not-dicom": 0xC000,
    "unreadable": 0xC001,
    "truncated": 0xC002,
    "unsupported-transfer-syntax": 0xC003,
    "too-deeply-nested": 0xC004,
}
UNKNOWN_REASON_STATUS = 0xC0FF


def failure_status(reason: str) -> int:
    """The C-STORE status that tells the sender why the instance was refused."""
    return FAILURE_STATUS.get(reason, UNKNOWN_REASON_STATUS)
