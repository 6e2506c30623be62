"""Process flow: stable studies -> preprocessing -> champion model -> predictions."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.retry import transient_only
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
def process_flow(task_name: str = "pneumonia-cxr") -> dict[str, object]:
    logger = get_run_logger()
    with Runtime.open(Settings()) as rt:
        report = score_stable(rt, task_name)
    logger.info(report.summary())
    return {
        "model": report.model,
        "scored": report.scored,
        "no_model": report.no_model,
        "failed": report.failed,
        "seconds": report.seconds,
        "network_seconds": report.network_seconds,
    }
