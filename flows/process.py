"""Process flow: stable studies -> preprocessing -> champion model -> predictions -> DICOM results
(SR, SEG) written and sent to the destinations routing names (flows/deliver.py)."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.deliver import deliver
from flows.retry import transient_only
from radflow.db.registry import champion_tasks
from radflow.ingest.routing import rules_for
from radflow.learning import scoring
from radflow.runtime import Runtime
from radflow.settings import Settings


@task(
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=transient_only,
)
def score_stable(rt: Runtime, task_name: str) -> scoring.ScoreReport:
    return scoring.score_stable(
        rt.session_factory,
        rt.store,
        task_name,
        rt.settings.batch_size,
        explain=rt.settings.gradcam,
        threads=rt.settings.torch_threads or None,
        rules=rules_for(rt.settings),
        cache_dir=rt.settings.cache_dir,
        max_voxels=rt.settings.max_volume_voxels,
    )


@flow(name="process")
def process_flow(task_name: str | None = None) -> dict[str, object]:
    """Score every stable study with the champion of ``task_name``, or of every task that has
    one (None). Totals at the top level; each task's own report under ``tasks``."""
    logger = get_run_logger()
    with Runtime.open(Settings()) as rt:
        if task_name is None:
            with rt.session_factory() as session:
                names = champion_tasks(session)
        else:
            names = [task_name]
        reports = {name: score_stable(rt, name) for name in names}
        results = deliver(rt)
    for report in reports.values():
        logger.info(report.summary())
    return {
        "scored": sum(r.scored for r in reports.values()),
        "no_model": sum(r.no_model for r in reports.values()),
        "failed": {uid: why for r in reports.values() for uid, why in r.failed.items()},
        "tasks": {
            name: {
                "model": r.model,
                "scored": r.scored,
                "no_model": r.no_model,
                "failed": len(r.failed),
                "seconds": r.seconds,
                "network_seconds": r.network_seconds,
            }
            for name, r in reports.items()
        },
        "results": results,
    }
