"""The DICOM receiver (``radflow receive``): C-STORE SCP, durable spool, background indexer."""

from radflow.ingest.receiver.counters import ReceiverCounters, load_counters
from radflow.ingest.receiver.indexer import Indexer
from radflow.ingest.receiver.scp import Receiver
from radflow.ingest.receiver.spool import Spool, SpoolBusy, count_waiting
from radflow.ingest.receiver.statuses import FAILURE_STATUS, failure_status
from radflow.ingest.receiver.workers import Supervisor, drain_orphans, spool_folders, worker_spool

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
    "load_counters",
    "spool_folders",
    "worker_spool",
]
