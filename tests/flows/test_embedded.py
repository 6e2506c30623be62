"""Flow runs on the embedded default skip Prefect's heartbeat thread; with a server they keep it.
Flow runs in one block share one API client."""

from __future__ import annotations

from prefect import flow
from prefect.context import FlowRunContext
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    get_current_settings,
    temporary_settings,
)
from servers import PrefectServer

from flows.embedded import no_heartbeats, run_settings


def test_no_heartbeats_without_a_prefect_server() -> None:
    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert get_current_settings().flows.heartbeat_frequency is not None  # Prefect's default
        with no_heartbeats():
            assert get_current_settings().flows.heartbeat_frequency is None
        assert get_current_settings().flows.heartbeat_frequency is not None  # restored


def test_a_prefect_server_keeps_the_operators_heartbeat_setting() -> None:
    updates = {
        PREFECT_API_URL: "http://prefect.example:4200/api",
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 45,
    }
    with temporary_settings(updates=updates), no_heartbeats():
        assert get_current_settings().flows.heartbeat_frequency == 45


@flow
def _client_of_this_run() -> object:
    context = FlowRunContext.get()
    assert context is not None and context.client is not None
    return context.client


def test_flow_runs_in_one_block_share_one_api_client(prefect_api: PrefectServer) -> None:
    # Each client loaded the CA bundle into an SSL context first: 40-80 ms of every flow run.
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 45}), run_settings():
        assert get_current_settings().flows.heartbeat_frequency == 45  # a server: kept
        first, second = _client_of_this_run(), _client_of_this_run()
    assert first is second
    assert _client_of_this_run() is not first  # outside a block: a client per run, as before
