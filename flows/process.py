"""Process flow: stable studies -> preprocessing -> champion (its served runtime) -> predictions.

The DICOM results of those predictions (SR, SEG, sent to the destinations routing names) are
the deliver flow's (flows/deliver.py), a stage of its own: an SR costs ~0.1 s of CPU in
highdicom, a thousand times a score, so writing them inside this flow would hold the worklist's
scores back behind them. With a Prefect server, this flow's :data:`SCORED_EVENT` starts the
deliver deployment; on the embedded default, :func:`process_and_deliver` runs one after the
other.

Scoring a task is exclusive work: the run holds the task's scoring lease (radflow.leases) and
scores until nothing is pending; a run that finds a live holder leaves at once (the holder
looks again after letting go), and one whose holder died takes over within
``SCORING_LEASE`` and marks the dead run Crashed. So runs need no concurrency limit on the
server, a burst of triggers scores everything once, and a killed worker blocks nothing for
long. Workers on several machines share only the database, the object store and the Prefect
server: each reads images from the store through its own local preprocessing cache.

With ``RADFLOW_DASK_ADDRESS`` set, a backlog is cut into shards of ``dask_shard_studies``
studies scored on the Dask cluster's workers at once (Prefect's Dask task runner); the run
holding the lease waits for them, so the shards never overlap another run's.

The process deployment's runs start for events and the schedule; a process-pool worker also
runs the flow in its own warm process, for studies its listener finds (flows/listener.py).
"""

from __future__ import annotations

import time
from datetime import timedelta

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.deliver import deliver_flow
from flows.launcher import SCORED_EVENT, crash_dead_run, emit, holder, orchestrated
from flows.retry import transient_only
from radflow import leases
from radflow.db.registry import champion_tasks
from radflow.ingest.routing import rules_for
from radflow.learning import scoring
from radflow.runtime import Runtime
from radflow.settings import Settings

SCORING_LEASE = timedelta(seconds=6)
"""Renewed every 2 s while a run scores; a run whose worker died blocks scoring at most this
(15 s was most of the recovery from a worker killed while scoring in benchmarks/pipeline.py).
A renewal late past it only lets a second run score beside the first: what both write is kept
once by the database's uniqueness rules."""


def scoring_lease(task_name: str) -> str:
    return f"score:{task_name}"


def _score(rt: Runtime, task_name: str, ids: list[int] | None = None) -> scoring.ScoreReport:
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
        ids=ids,
    )


@task(
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=transient_only,
)
def score_stable(rt: Runtime, task_name: str) -> scoring.ScoreReport:
    return _score(rt, task_name)


@task(
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=transient_only,
)
def score_shard(settings: Settings, task_name: str, ids: list[int]) -> scoring.ScoreReport:
    """One shard of a backlog, on a Dask worker: its own connections and local cache."""
    with Runtime.open(settings) as rt:
        return _score(rt, task_name, ids)


def score_on_dask(rt: Runtime, task_name: str, address: str) -> scoring.ScoreReport:
    """Every pending study of ``task_name``, in shards on the Dask cluster at ``address``."""
    from prefect_dask import DaskTaskRunner

    report = scoring.ScoreReport()
    size = rt.settings.dask_shard_studies
    started = time.perf_counter()
    with DaskTaskRunner(address=address) as runner:
        while True:
            with rt.session_factory() as session:
                ids = scoring.pending_ids(session, task_name)
            if not ids:
                report.seconds = time.perf_counter() - started  # wall time, not the shards' sum
                return report
            shards = [ids[i : i + size] for i in range(0, len(ids), size)]
            futures = [
                runner.submit(
                    score_shard,
                    parameters={"settings": rt.settings, "task_name": task_name, "ids": shard},
                )
                for shard in shards
            ]
            for future in futures:
                report.add(future.result())


def score_task(rt: Runtime, task_name: str, who: str) -> scoring.ScoreReport:
    """Score ``task_name`` under its lease until nothing is pending (see the module doc)."""
    address = rt.settings.dask_address

    def work() -> scoring.ScoreReport:
        if address:
            return score_on_dask(rt, task_name, address)
        return score_stable(rt, task_name)

    def more() -> bool:
        with rt.session_factory() as session:
            return scoring.has_pending(session, task_name)

    report = scoring.ScoreReport()
    for turn in leases.take_turns(
        rt.session_factory,
        scoring_lease(task_name),
        who,
        SCORING_LEASE,
        work=work,
        more=more,
        taken_over=crash_dead_run,
    ):
        report.add(turn)
    return report


@flow(name="process")
def process_flow(task_name: str | None = None, announce: bool = True) -> dict[str, object]:
    """Score every stable study with the champion of ``task_name``, or of every task that has
    one (None). Totals at the top level; each task's own report under ``tasks``. With a server
    and ``announce``, an event starts the deliver deployment for what was scored (the worker's
    listener delivers in its own process instead)."""
    logger = get_run_logger()
    with Runtime.open(Settings()) as rt:
        with rt.session_factory() as session:
            names = [task_name] if task_name is not None else champion_tasks(session)
        who = holder()
        reports = {name: score_task(rt, name, who) for name in names}
    for report in reports.values():
        logger.info(report.summary())
    scored = sum(r.scored for r in reports.values())
    if scored and announce and orchestrated():
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
