"""Process flow: stable studies -> preprocessing -> champion (its served runtime) -> predictions.

The DICOM results of those predictions (SR, SEG, sent to the destinations routing names) are
the deliver flow's (flows/deliver.py), a stage of its own: an SR costs ~0.1 s of CPU in
highdicom, a thousand times a score, so writing them inside this flow would hold the worklist's
scores back behind them. With a Prefect server, this flow's :data:`SCORED_EVENT` starts the
deliver deployment; on the embedded default, :func:`process_and_deliver` runs one after the
other.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.deliver import deliver_flow
from flows.launcher import SCORED_EVENT, emit, orchestrated
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
    for report in reports.values():
        logger.info(report.summary())
    scored = sum(r.scored for r in reports.values())
    if scored and orchestrated():
        emit(SCORED_EVENT, {"prefect.resource.id": "radflow.predictions"})
    return {
        "scored": scored,
        "no_model": sum(r.no_model for r in reports.values()),
        "failed": {uid: why for r in reports.values() for uid, why in r.failed.items()},
        "tasks": {
            name: {
                "model": r.model,
                "runtime": r.runtime,
                "scored": r.scored,
                "no_model": r.no_model,
                "failed": len(r.failed),
                "seconds": r.seconds,
                "network_seconds": r.network_seconds,
            }
            for name, r in reports.items()
        },
    }


def process_and_deliver(task_name: str | None = None) -> dict[str, object]:
    """The process flow, then (on the embedded default) the deliver flow: what a command, the
    demo or the embedded trigger runs. The process flow's result, with the deliver flow's
    under ``results``; with a Prefect server, the deliver deployment runs on the event instead
    and ``results`` is None."""
    processed = process_flow(task_name)
    processed["results"] = None if orchestrated() else deliver_flow()
    return processed
