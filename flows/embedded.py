"""Prefect settings for flow runs on the embedded default (no Prefect server configured)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings


@contextlib.contextmanager
def run_settings() -> Iterator[None]:
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
