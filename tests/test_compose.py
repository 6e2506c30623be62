"""docker-compose.yml configures Radflow only through settings that exist.

Docker cannot run in the test environment, so these check the file itself: a misspelt
RADFLOW_* variable would otherwise be silently ignored by pydantic-settings.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from radflow.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"

# The third-party images read their own variables.
IMAGE_PREFIXES = {"postgres": ("POSTGRES_",), "minio": ("MINIO_",)}


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the "- KEY=value" form
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): str(value) for key, value in env.items()}


SERVICES = _compose()["services"]


def test_the_platform_services_are_all_there() -> None:
    expected = {"postgres", "minio", "prefect-server", "worker", "receiver", "dashboard"}
    assert expected <= set(SERVICES)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_environment_uses_only_radflow_and_prefect_variables(name: str) -> None:
    allowed = ("RADFLOW_", "PREFECT_", *IMAGE_PREFIXES.get(name, ()))
    stray = sorted(key for key in _environment(SERVICES[name]) if not key.startswith(allowed))
    assert stray == [], f"service {name!r} sets {stray}; configure it with {allowed} only"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_radflow_variable_is_a_settings_field(name: str) -> None:
    fields = {f"RADFLOW_{field.upper()}" for field in Settings.model_fields}
    unknown = sorted(
        key
        for key in _environment(SERVICES[name])
        if key.startswith("RADFLOW_") and key not in fields
    )
    assert unknown == [], (
        f"service {name!r} sets {unknown}, which radflow.settings.Settings ignores"
    )


def test_every_radflow_variable_named_in_the_file_is_a_settings_field() -> None:
    """Commented-out ones too (the receiver's TLS files): uncommented, they must work.
    ``RADFLOW_*`` patterns in the prose are not names."""
    fields = {f"RADFLOW_{field.upper()}" for field in Settings.model_fields}
    named = set(re.findall(r"\bRADFLOW_[A-Z0-9_]+\b(?!\*)", COMPOSE.read_text()))
    assert {"RADFLOW_RECEIVER_TLS_CERT_FILE", "RADFLOW_RECEIVER_TLS_KEY_FILE"} <= named
    assert sorted(named - fields) == []


def test_radflow_services_share_one_configuration() -> None:
    for name in ("worker", "receiver", "dashboard"):
        env = _environment(SERVICES[name])
        assert env["RADFLOW_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert env["RADFLOW_STORE_URL"].startswith("s3://"), name
        assert env["RADFLOW_S3_ENDPOINT"] == "minio:9000", name
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api", name


def test_dependencies_exist_and_wait_for_health() -> None:
    for name, service in SERVICES.items():
        depends_on = service.get("depends_on") or {}
        assert isinstance(depends_on, dict), f"{name}: use depends_on with conditions"
        for dependency, spec in depends_on.items():
            assert dependency in SERVICES, f"{name} depends on unknown service {dependency!r}"
            condition = spec.get("condition")
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[dependency], f"{dependency} has no healthcheck"
            else:
                assert condition == "service_completed_successfully", (name, dependency, condition)


def test_named_volumes_are_declared() -> None:
    declared = set(_compose().get("volumes") or {})
    for name, service in SERVICES.items():
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} uses undeclared volume {source!r}"


# --- what a hostile network meets (issue 16) ----------------------------------------------------

CADDYFILE = ROOT / "Caddyfile"


def _published(service: dict[str, Any]) -> set[str]:
    return {str(port).split(":")[-2] for port in service.get("ports") or []}


def test_browsers_reach_the_dashboard_and_prefect_only_through_the_tls_proxy() -> None:
    assert _published(SERVICES["dashboard"]) == _published(SERVICES["prefect-server"]) == set()
    assert {"443", "4200"} <= _published(SERVICES["proxy"])
    assert "./Caddyfile:/etc/caddy/Caddyfile:ro" in SERVICES["proxy"]["volumes"]
    sites = CADDYFILE.read_text()
    assert "reverse_proxy dashboard:8501" in sites
    assert "reverse_proxy prefect-server:4200" in sites
    assert "http://" not in sites  # every site is served over TLS
    # Only the proxy reaches the dashboard, so its forwarded scheme and address are believed.
    assert _environment(SERVICES["dashboard"])["RADFLOW_DASHBOARD_TRUSTED_PROXIES"] == "*"
    ui_api = _environment(SERVICES["prefect-server"])["PREFECT_UI_API_URL"]
    assert ui_api.startswith("https://")


def test_prefect_asks_every_client_for_its_password() -> None:
    server = _environment(SERVICES["prefect-server"])
    assert server["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_API_AUTH_STRING:?")
    for name, service in SERVICES.items():
        env = _environment(service)
        if "PREFECT_API_URL" in env:
            assert env["PREFECT_API_AUTH_STRING"] == server["PREFECT_SERVER_API_AUTH_STRING"], name


def test_no_secret_has_a_public_default_and_the_receiver_names_its_senders() -> None:
    for name in ("worker", "receiver", "dashboard", "migrate"):
        key = _environment(SERVICES[name])["RADFLOW_PSEUDONYM_KEY"]
        assert key.startswith("${RADFLOW_PSEUDONYM_KEY:?"), name  # compose stops without it
    senders = Settings(
        allowed_calling_aets=yaml.safe_load(
            _environment(SERVICES["receiver"])["RADFLOW_ALLOWED_CALLING_AETS"]
        )
    ).allowed_calling_aets
    assert senders and all(senders)
