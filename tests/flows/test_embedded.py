"""Flow runs on the embedded default skip Prefect's heartbeat thread; with a server they keep it."""

from __future__ import annotations

from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    get_current_settings,
    temporary_settings,
)

from flows.embedded import run_settings


def test_no_heartbeats_without_a_prefect_server() -> None:
    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert get_current_settings().flows.heartbeat_frequency is not None  # Prefect's default
        with run_settings():
            assert get_current_settings().flows.heartbeat_frequency is None
        assert get_current_settings().flows.heartbeat_frequency is not None  # restored


def test_a_prefect_server_keeps_the_operators_heartbeat_setting() -> None:
    updates = {
        PREFECT_API_URL: "http://prefect.example:4200/api",
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 45,
    }
    with temporary_settings(updates=updates), run_settings():
        assert get_current_settings().flows.heartbeat_frequency == 45
