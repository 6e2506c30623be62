"""What the receiver checks before it acknowledges an instance, beyond its header.

:func:`radflow.dicom.instance.read_header` says whether the file is an instance Radflow can
take. Two more things are cheap to prove before the sender gets its status, and refusing then
tells the sender, while an index refusal after the acknowledgement only tells the log:

- **The C-STORE command names the instance it carries** (:func:`command_mismatch`): its
  Affected SOP Instance and Class UIDs are the data set's (PS3.4 B.2.3, PS3.7 9.1.1.1). A
  mismatch is a sender's bug that would file the instance under the wrong name.
- **A SOP Instance UID already indexed belongs to the same patient, study and series**
  (:class:`IndexedIdentity`): one lookup on the instance table's unique index, started with
  the command (before the data set has been checked) and run while the file is fsynced.
  The same UID with other pixels is the index's decision (after the acknowledgement).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from sqlalchemy import Engine, bindparam, select

from radflow.db import Instance, Patient, Series, Study
from radflow.dicom.instance import InstanceHeader
from radflow.dicom.pseudonym import pseudonymise
from radflow.errors import InvalidInstance
from radflow.ingest.receiver.statuses import SOP_CLASS_MISMATCH, SOP_INSTANCE_MISMATCH, UID_CONFLICT
from radflow.outages import FailureLog

logger = logging.getLogger(__name__)

# How long a C-STORE waits for the lookup (on top of the fsync it overlaps), and how long
# lookups pause after one failed or was too slow: the database must never hold up receiving.
LOOKUP_WAIT_SECONDS = 0.5
LOOKUP_PAUSE_SECONDS = 30.0
# What the index stores as the patient of an instance without a Patient ID
# (radflow.ingest.index keys patients by the pseudonym of this).
NO_PATIENT_ID = "(no patient id)"


def command_mismatch(
    sop_class_uid: str, sop_instance_uid: str, header: InstanceHeader
) -> InvalidInstance | None:
    """Why the C-STORE command's UIDs are not the data set's, or None if they are."""
    sent = sop_instance_uid.strip("\0 ")
    if sent != header.sop_instance_uid:
        return InvalidInstance(
            SOP_INSTANCE_MISMATCH,
            f"the C-STORE request's Affected SOP Instance UID {sent} is not the data set's "
            f"SOP Instance UID {header.sop_instance_uid}; the sender must send the data set's",
        )
    sent = sop_class_uid.strip("\0 ")
    if sent != header.sop_class_uid:
        return InvalidInstance(
            SOP_CLASS_MISMATCH,
            f"the C-STORE request's Affected SOP Class UID {sent} is not the data set's SOP "
            f"Class UID {header.sop_class_uid} (instance {header.sop_instance_uid})",
        )
    return None


@dataclass(frozen=True)
class Identity:
    """Where an instance is indexed: its series, study and patient (pseudonym)."""

    series_uid: str
    study_uid: str
    patient: str


_LOOKUP = (
    select(Series.series_uid, Study.study_uid, Patient.pseudonym)
    .select_from(Instance)
    .join(Instance.series)
    .join(Series.study)
    .join(Study.patient)
    .where(Instance.sop_instance_uid == bindparam("uid"))
)


class IndexedIdentity:
    """Whether a SOP Instance UID is already indexed under another patient, study or series.

    Only an aid: when the database is down or slow the receiver keeps acknowledging, so a
    lookup that fails or takes longer than :data:`LOOKUP_WAIT_SECONDS` counts as "not known"
    and lookups pause for :data:`LOOKUP_PAUSE_SECONDS` (one log line); the index still refuses
    such an instance later (``uid-conflict``, kept in ``spool/rejected``).
    """

    def __init__(self, engine: Engine, pseudonym_key: str) -> None:
        self.engine = engine
        self.pseudonym_key = pseudonym_key
        self._paused_until = 0.0
        self._lock = threading.Lock()
        self._failures = FailureLog(logger)

    def start(
        self, executor: ThreadPoolExecutor, sop_instance_uid: str
    ) -> Future[Identity | None] | None:
        """Look ``sop_instance_uid`` up in ``executor``; None while lookups are paused."""
        with self._lock:
            if time.monotonic() < self._paused_until:
                return None
        return executor.submit(self._look_up, sop_instance_uid.strip("\0 "))

    def _look_up(self, sop_instance_uid: str) -> Identity | None:
        with self.engine.connect() as connection:
            row = connection.execute(_LOOKUP, {"uid": sop_instance_uid}).first()
        return None if row is None else Identity(*row)

    def conflict(
        self, pending: Future[Identity | None] | None, header: InstanceHeader
    ) -> InvalidInstance | None:
        """Why ``header``'s instance cannot be the one indexed under its UID, or None."""
        if pending is None:
            return None
        try:
            indexed = pending.result(timeout=LOOKUP_WAIT_SECONDS)
        except FutureTimeout:
            self._pause(TimeoutError(f"no answer within {LOOKUP_WAIT_SECONDS} s"))
            return None
        except Exception as exc:  # the database's problem, never the sender's: paused, logged
            self._pause(exc)
            return None
        if indexed is None:
            return None
        patient = pseudonymise(header.patient_id or NO_PATIENT_ID, self.pseudonym_key)
        arriving = Identity(header.series_uid, header.study_uid, patient)
        if arriving == indexed:
            return None
        differs = [
            name
            for name, old, new in zip(
                ("series", "study", "patient"), _fields(indexed), _fields(arriving), strict=True
            )
            if old != new
        ]
        return InvalidInstance(
            UID_CONFLICT,
            f"SOP Instance UID {header.sop_instance_uid} is already stored as part of another "
            f"{' and '.join(differs)}; the sender must assign a new SOP Instance UID to an "
            "instance whose patient, study or series changed",
        )

    def _pause(self, exc: BaseException) -> None:
        """Stop looking up for a while; an outage (or a timeout) is one log line, anything
        else shows its traceback once."""
        with self._lock:
            self._paused_until = time.monotonic() + LOOKUP_PAUSE_SECONDS
        self._failures.failed(
            "looking a received instance up in the index",
            exc,
            then=f"acknowledging without that check for {LOOKUP_PAUSE_SECONDS:.0f} s (the "
            "indexer still refuses conflicts)",
        )


def _fields(identity: Identity) -> tuple[str, str, str]:
    return identity.series_uid, identity.study_uid, identity.patient
