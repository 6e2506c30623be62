"""Why the receiver refuses: one C-STORE failure status per instance reason, one A-ASSOCIATE-RJ
per association reason.

The instance reason codes are those of :class:`radflow.errors.InvalidInstance` (raised by
:func:`radflow.dicom.instance.read_header`, and by the receiver's own checks). The status classes
follow DICOM PS3.4 Annex B.2.3:

====================================  ========  ==========================================
reason                                status    class
====================================  ========  ==========================================
missing-uid                           0xA900    Error: data set does not match SOP class
invalid-uid                           0xA901    Error: data set does not match SOP class
no-pixel-data                         0xA902    Error: data set does not match SOP class
bad-dimensions                        0xA903    Error: data set does not match SOP class
pixel-data-mismatch                   0xA904    Error: data set does not match SOP class
sop-instance-mismatch (command)       0xA905    Error: data set does not match SOP class
sop-class-mismatch (command)          0xA906    Error: data set does not match SOP class
uid-conflict (indexed elsewhere)      0xA907    Error: data set does not match SOP class
too-large                             0xA700    Refused: out of resources
indexer-down                          0xA700    Refused: out of resources
out-of-resources (spool disk)         0xA701    Refused: out of resources
not-dicom                             0xC000    Error: cannot understand
unreadable                            0xC001    Error: cannot understand
truncated                             0xC002    Error: cannot understand
unsupported-transfer-syntax           0xC003    Error: cannot understand
too-deeply-nested                     0xC004    Error: cannot understand
unprocessable (unexpected error)      0xC005    Error: cannot understand
any other reason                      0xC0FF    Error: cannot understand
====================================  ========  ==========================================

Senders (and their logs) see which rule an instance broke; ``radflow status`` counts the same
reasons. ``uid-conflict`` is also found after the success status, when indexing (the instance is
then kept in ``spool/rejected``, as is one whose indexing fails unexpectedly: ``unprocessable``).

Associations are refused before any instance is sent (PS3.8 9.3.4: result, source, reason),
each recorded as a rejection with its reason code:

================================  ===========================================================
reason                            A-ASSOCIATE-RJ
================================  ===========================================================
called-aet-not-ours               permanent, service user: called AE title not recognised
calling-aet-not-allowed           permanent, service user: calling AE title not recognised
no-presentation-context           permanent, service user: no reason given (none acceptable)
malformed-association             permanent, service user: no reason given (a presentation
                                  context without its syntaxes, or a request that cannot be read)
indexer-down                      transient, service provider: temporary congestion
out-of-resources                  transient, service provider: temporary congestion
================================  ===========================================================

and ``pdu-too-large``: a PDU longer than ``RADFLOW_RECEIVER_MAX_PDU_BYTES`` (or anything but an
A-ASSOCIATE-RQ first) ends the connection with an A-ABORT before its body is read; and, when the
receiver speaks TLS, ``tls-handshake-failed``: a connection whose TLS handshake failed (a sender
without TLS, or without the client certificate mutual TLS asks for) is closed before any PDU.
"""

from __future__ import annotations

SUCCESS = 0x0000
OUT_OF_RESOURCES = "out-of-resources"
INDEXER_DOWN = "indexer-down"
UNPROCESSABLE = "unprocessable"
SOP_INSTANCE_MISMATCH = "sop-instance-mismatch"
SOP_CLASS_MISMATCH = "sop-class-mismatch"
UID_CONFLICT = "uid-conflict"
CALLED_AET_NOT_OURS = "called-aet-not-ours"
CALLING_AET_NOT_ALLOWED = "calling-aet-not-allowed"
NO_PRESENTATION_CONTEXT = "no-presentation-context"
MALFORMED_ASSOCIATION = "malformed-association"
PDU_TOO_LARGE = "pdu-too-large"
TLS_HANDSHAKE_FAILED = "tls-handshake-failed"

FAILURE_STATUS: dict[str, int] = {
    "missing-uid": 0xA900,
    "invalid-uid": 0xA901,
    "no-pixel-data": 0xA902,
    "bad-dimensions": 0xA903,
    "pixel-data-mismatch": 0xA904,
    SOP_INSTANCE_MISMATCH: 0xA905,
    SOP_CLASS_MISMATCH: 0xA906,
    UID_CONFLICT: 0xA907,
    "too-large": 0xA700,
    INDEXER_DOWN: 0xA700,
    OUT_OF_RESOURCES: 0xA701,
    "not-dicom": 0xC000,
    "unreadable": 0xC001,
    "truncated": 0xC002,
    "unsupported-transfer-syntax": 0xC003,
    "too-deeply-nested": 0xC004,
    UNPROCESSABLE: 0xC005,
}
UNKNOWN_REASON_STATUS = 0xC0FF

# A-ASSOCIATE-RJ (result, source, reason/diagnostic), PS3.8 9.3.4.
_PERMANENT, _TRANSIENT = 0x01, 0x02
_SERVICE_USER, _PRESENTATION_PROVIDER = 0x01, 0x03
ASSOCIATION_REJECT: dict[str, tuple[int, int, int]] = {
    CALLED_AET_NOT_OURS: (_PERMANENT, _SERVICE_USER, 0x07),
    CALLING_AET_NOT_ALLOWED: (_PERMANENT, _SERVICE_USER, 0x03),
    NO_PRESENTATION_CONTEXT: (_PERMANENT, _SERVICE_USER, 0x01),
    MALFORMED_ASSOCIATION: (_PERMANENT, _SERVICE_USER, 0x01),
    INDEXER_DOWN: (_TRANSIENT, _PRESENTATION_PROVIDER, 0x01),
    OUT_OF_RESOURCES: (_TRANSIENT, _PRESENTATION_PROVIDER, 0x01),
}


def failure_status(reason: str) -> int:
    """The C-STORE status that tells the sender why the instance was refused."""
    return FAILURE_STATUS.get(reason, UNKNOWN_REASON_STATUS)
