"""Getting studies in: the DICOM receiver, the watch folder and importers all end in ``index``.

- ``index``: validated files into the object store and the database, idempotently;
- ``receiver``: the C-STORE SCP, its durable spool and the indexer thread behind it;
- ``watch``: files and zips dropped in the inbox; ``importers``: labelled datasets as studies;
- ``stability``: when a study is complete; ``routing``: which series a task applies to.
"""

from radflow.ingest.index import (
    IngestReport,
    Outcome,
    find_files,
    ingest_batch,
    ingest_file,
    ingest_files,
    mark_stable,
    refusal,
    rejection,
)

__all__ = [
    "IngestReport",
    "Outcome",
    "find_files",
    "ingest_batch",
    "ingest_file",
    "ingest_files",
    "mark_stable",
    "refusal",
    "rejection",
]
