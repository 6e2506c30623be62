"""Prefect settings for flow runs started in this process (the CLI, the receiver, the demo)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect.context import SyncClientContext
from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings


@contextlib.contextmanager
def run_settings() -> Iterator[None]:
    """Flow runs started inside this block share one Prefect API client, and send no heartbeats
    unless a Prefect server runs (:func:`no_heartbeats`).

    One client: Prefect makes a client for each flow run that finds none in its context, and a
    client's first act is loading the CA bundle into an SSL context (40-80 ms on 2 cores, even
    for a plain-HTTP API), then opening a connection. The process flow scoring a few thousand
    cached studies takes about a second, so that was a tenth of its run; a block that runs
    the process flow and then the deliver flow (``process_and_deliver``) paid it twice. The
    block's client is Prefect's own SyncClientContext, which every flow run in it picks up;
    entering it checks the API version, as the first flow run would have (on the embedded
    default, the temporary server starts here, as the first flow run would have started it).
    """
    with no_heartbeats(), SyncClientContext.get_or_create():
        yield


@contextlib.contextmanager
def no_heartbeats() -> Iterator[None]:
    """Flow runs started inside this block send no heartbeats, unless a Prefect server runs.

    Heartbeats let a server mark a flow run whose process died as crashed. The embedded
    default's temporary server has nothing that reads them, and Prefect 3.8 joins the heartbeat
    thread, which sleeps in 1 s steps, when every flow run ends: up to a second per run, which
    was most of the cost of a process flow run scoring a few studies. The setting cannot be
    switched off through the environment (it accepts 30 s or more), and it is read from the
    calling thread's settings context, so it is entered where a flow is called. With
    PREFECT_API_URL set, runs keep the operator's heartbeat setting.
    """
    if PREFECT_API_URL.value():
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
