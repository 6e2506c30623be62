"""Deliver flow: an SR for every newly scored study, and results sent to their destinations.

Started after each process flow run that recorded predictions (by its event with a Prefect
server, flows/deployments.py; by flows.process.process_and_deliver on the embedded default), and
every minute by its deployment, which sends what is due again after a backoff. The logic lives
in radflow.delivery and runs without Prefect.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.retry import transient_only
from radflow.delivery import outbox, reports
from radflow.ingest.routing import rules_for
from radflow.runtime import Runtime
from radflow.settings import Settings


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10, retry_condition_fn=transient_only)
def write_reports(rt: Runtime) -> reports.ReportRun:
    return reports.write_reports(rt.session_factory, rt.store, rules_for(rt.settings))


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10, retry_condition_fn=transient_only)
def send_results(rt: Runtime) -> outbox.SendReport:
    return outbox.send_due(rt.session_factory, rt.store, rt.settings, rules_for(rt.settings))


@flow(name="deliver")
def deliver_flow() -> dict[str, object]:
    """Write the new reports, then send what is due; the totals."""
    logger = get_run_logger()
    with Runtime.open(Settings()) as rt:
        written = write_reports(rt)
        sent = send_results(rt)
    logger.info("%s; %s", written.summary(), sent.summary())
    return {
        "reports": written.written,
        "reports_set_aside": written.failed,
        "sent": sent.sent,
        "retrying": sent.retrying,
        "parked": sent.parked,
    }
