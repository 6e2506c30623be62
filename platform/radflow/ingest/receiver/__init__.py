"""The DICOM receiver (``radflow receive``): C-STORE SCP, durable spool, background indexer.

pynetdicom is imported only with :class:`Receiver` (on first use of the name): ``radflow
status`` reads the counters and spool through this package with no DICOM networking loaded.
"""

from typing import TYPE_CHECKING, Any

from radflow.ingest.receiver.counters import ReceiverCounters
from radflow.ingest.receiver.indexer import Indexer
from radflow.ingest.receiver.report import spool_report
from radflow.ingest.receiver.spool import Spool, SpoolBusy, count_waiting
from radflow.ingest.receiver.statuses import FAILURE_STATUS, failure_status
from radflow.ingest.receiver.workers import Supervisor, drain_orphans, spool_folders, worker_spool

if TYPE_CHECKING:
    from radflow.ingest.receiver.scp import Receiver

__all__ = [
    "FAILURE_STATUS",
    "Indexer",
    "Receiver",
    "ReceiverCounters",
    "Spool",
    "SpoolBusy",
    "Supervisor",
    "count_waiting",
    "drain_orphans",
    "failure_status",
    "spool_folders",
    "spool_report",
    "worker_spool",
]


def __getattr__(name: str) -> Any:
    if name == "Receiver":
        from radflow.ingest.receiver.scp import Receiver

        return Receiver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
