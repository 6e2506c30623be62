"""The DICOM receiver (``radflow receive``): C-STORE SCP, durable spool, background indexer."""

from radflow.receiver.counters import ReceiverCounters, load_counters
from radflow.receiver.indexer import Indexer
from radflow.receiver.scp import Receiver
from radflow.receiver.spool import Spool, SpoolBusy, count_waiting
from radflow.receiver.statuses import FAILURE_STATUS, failure_status

__all__ = [
    "FAILURE_STATUS",
    "Indexer",
    "Receiver",
    "ReceiverCounters",
    "Spool",
    "SpoolBusy",
    "count_waiting",
    "failure_status",
    "load_counters",
]
