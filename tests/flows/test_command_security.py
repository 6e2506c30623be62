"""The ``radflow`` commands as a security reviewer tries them (issue 16): the public pseudonym key
is refused wherever patient data is handled, nobody records work under someone else's name, and
account changes are audited as the operating-system user who made them."""

from __future__ import annotations

import io
import stat
from pathlib import Path

import pytest
from factories import make_study
from pydantic import SecretStr
from sqlalchemy import select

from cli.actor import os_user
from cli.main import main
from demo.pipeline import ensure_demo_key
from radflow.db import AuditEvent, Label
from radflow.runtime import Runtime
from radflow.settings import DEVELOPMENT_PSEUDONYM_KEY, Settings

PASSWORD = "a long enough passphrase 42"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data dir in the environment, no pseudonym key set: the public default applies."""
    for name in ("RADFLOW_PSEUDONYM_KEY", "RADFLOW_PSEUDONYM_KEY_FILE", "RADFLOW_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RADFLOW_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RADFLOW_STORE_URL", "")
    return tmp_path / "data"


@pytest.mark.parametrize(
    "argv",
    [
        ["receive", "--port", "0"],
        ["ingest", "."],
        ["watch", "--once"],
        ["export", "1.2.3", "out"],
        ["import", "npz", "x.npz"],
        ["worker"],
    ],
    ids=lambda argv: argv[0],
)
def test_patient_data_is_never_handled_with_the_public_key(
    env: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert Settings().pseudonym_key.get_secret_value() == DEVELOPMENT_PSEUDONYM_KEY
    assert main(argv) == 2
    assert "set RADFLOW_PSEUDONYM_KEY" in capsys.readouterr().err


def test_the_demo_makes_its_own_private_key(env: Path) -> None:
    settings = ensure_demo_key(Settings())
    key_file = env / "pseudonym.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # Every later process on this data dir reads it, and no longer runs on the public key.
    again = Settings()
    assert again.pseudonym_key == settings.pseudonym_key
    assert again.pseudonym_key.get_secret_value() != DEVELOPMENT_PSEUDONYM_KEY
    again.require_pseudonym_key()


def _events(settings: Settings, action: str) -> list[AuditEvent]:
    with Runtime.open(settings) as rt, rt.session_factory() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def test_a_cli_label_is_authored_by_who_runs_it_or_who_proves_it(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(pseudonym_key=SecretStr("k" * 32))
    with Runtime.open(settings) as rt, rt.transaction() as session:
        uid = make_study(session, rt.store).study_uid
    with pytest.raises(SystemExit):  # the option that let anyone claim to be anyone is gone
        main(["label", uid, "normal", "--author", "rita"])
    assert main(["label", uid, "normal"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PASSWORD}\n"))
    assert main(["user", "add", "rita", "--role", "radiologist", "--password-stdin"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("not her password\n"))
    assert main(["--as", "rita", "label", uid, "pneumonia"]) == 2  # a wrong password: refused
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PASSWORD}\n"))
    assert main(["--as", "rita", "label", uid, "pneumonia"]) == 0
    with Runtime.open(settings) as rt, rt.session_factory() as session:
        authors = list(session.scalars(select(Label.author).order_by(Label.id)))
    assert authors == [f"os:{os_user()}", "rita"]
    assert [e.object_id for e in _events(settings, "login-failed")] == ["rita"]


def test_account_changes_from_the_cli_are_audited_as_the_os_user(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(pseudonym_key=SecretStr("k" * 32))
    monkeypatch.setattr("sys.stdin", io.StringIO("password\n"))
    assert main(["user", "add", "max", "--role", "radiologist", "--password-stdin"]) == 2
    assert "password" in capsys.readouterr().err  # too short, too common: says why
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PASSWORD}\n"))
    assert main(["user", "add", "max", "--role", "radiologist", "--password-stdin"]) == 0
    for argv in (["role", "max", "ml-engineer"], ["deactivate", "max"], ["reset-password", "max"]):
        assert main(["user", *argv]) == 0
    assert "temporary password (shown once)" in capsys.readouterr().out
    assert main(["user", "list"]) == 0
    assert capsys.readouterr().out.split() == [
        "max",
        "ml-engineer",
        "inactive",
        "must-change-password",
    ]
    with Runtime.open(settings) as rt, rt.session_factory() as session:
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.action.startswith("user-")).order_by(AuditEvent.seq)
        )
        done = [(e.actor, e.action) for e in events]
    me = f"os:{os_user()}"
    assert done == [
        (me, "user-add"),
        (me, "user-role"),
        (me, "user-deactivate"),
        (me, "user-reset-password"),
    ]


def test_a_command_refused_for_the_role_is_audited(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(pseudonym_key=SecretStr("k" * 32))
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PASSWORD}\n"))
    assert main(["user", "add", "rita", "--role", "radiologist", "--password-stdin"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PASSWORD}\n"))
    assert main(["--as", "rita", "user", "list"]) == 2
    assert "rita (radiologist) may not manage-users" in capsys.readouterr().err
    (denied,) = _events(settings, "permission-denied")
    assert (denied.actor, denied.object_type, denied.object_id) == (
        "rita",
        "command:user",
        "manage-users",
    )
