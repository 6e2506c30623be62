"""Deliver flow: an SR for every newly scored study, and results sent to their destinations.

Started after each process flow run that recorded predictions (by its event with a Prefect
server, flows/deployments.py; by flows.process.process_and_deliver on the embedded default; on
its own thread by the worker's listener, flows/listener.py, for what it scored), and
every minute by its deployment, which sends what is due again after a backoff. The logic lives
in radflow.delivery and runs without Prefect.

Writing reports is exclusive work, like scoring (flows/process.py): the run holds the reports
lease while it writes, and a run that finds a live holder leaves the reports to it (the holder
looks again after letting go). Without it, two runs started together (a burst of scoring
events; the embedded demo's own run beside the one a promotion starts) would both build every
SR, the database's unique constraint keeping one: the CPU of one SR (~0.1 s) wasted per
prediction. Sending needs no lease: the outbox claims each delivery row.
"""

from __future__ import annotations

from datetime import timedelta

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.launcher import crash_dead_run, holder
from flows.retry import transient_only
from radflow import leases
from radflow.delivery import outbox, reports
from radflow.ingest.routing import rules_for
from radflow.runtime import Runtime
from radflow.settings import Settings

REPORTS_LEASE = "reports"
REPORTS_LEASE_TTL = timedelta(seconds=15)
"""Renewed every 5 s while a run writes; a run whose worker died blocks reports at most this."""


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10, retry_condition_fn=transient_only)
def write_reports(rt: Runtime) -> reports.ReportRun:
    """Write the new reports under the reports lease; nothing if another live run holds it."""

    def work() -> reports.ReportRun:
        return reports.write_reports(rt.session_factory, rt.store, rules_for(rt.settings))

    def more() -> bool:
        with rt.session_factory() as session:
            return reports.has_unreported(session)

    total = reports.ReportRun()
    for turn in leases.take_turns(
        rt.session_factory,
        REPORTS_LEASE,
        holder(),
        REPORTS_LEASE_TTL,
        work=work,
        more=more,
        taken_over=crash_dead_run,
    ):
        total.add(turn)
    return total


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
