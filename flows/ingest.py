"""Ingest flow: a folder of DICOM files -> object store + database index."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.retry import transient_only
from radflow import ingest
from radflow.db import unit_of_work
from radflow.runtime import Runtime
from radflow.settings import Settings


@task(
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=transient_only,
)
def ingest_folder(rt: Runtime, folder: Path) -> ingest.IngestReport:
    # Retrying is safe: an instance already indexed is recognised and skipped.
    return ingest.ingest_files(
        ingest.find_files(folder),
        settings=rt.settings,
        session_factory=rt.session_factory,
        store=rt.store,
    )


@task(
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=transient_only,
)
def mark_stable(rt: Runtime, study_uids: set[str]) -> int:
    with unit_of_work(rt.session_factory) as session:
        return ingest.mark_stable(session, study_uids)


@flow(name="ingest", log_prints=False)
def ingest_flow(folder: str) -> dict[str, object]:
    """Ingest every file under ``folder``; a folder is complete, so its studies become stable."""
    logger = get_run_logger()
    with Runtime.open(Settings()) as rt:
        report = ingest_folder(rt, Path(folder))
        stable = mark_stable(rt, report.study_uids)
    logger.info("%s; %d studies stable", report.summary(), stable)
    return {
        "stored": report.stored,
        "duplicates": report.duplicates,
        "rejected": report.rejected,
        "warnings": report.warnings,
        "stable_studies": stable,
    }
