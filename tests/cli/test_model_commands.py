"""``radflow model serve`` / ``rollback --serving`` / ``list``: the runtime a version scores in,
chosen and undone from the command line, audited, with the way out when it may not serve."""

from __future__ import annotations

import json

import pytest
from factories import add_variant, make_model_version
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cli.actor import os_user
from cli.main import main
from radflow.db import AuditEvent, ModelStatus, unit_of_work
from radflow.settings import Settings

TASK = "pneumonia-cxr"


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_serve_list_and_roll_back_the_runtime(
    settings: Settings,
    session_factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("RADFLOW_DATA_DIR", str(settings.data_dir))
    with unit_of_work(session_factory) as session:
        v1 = make_model_version(session, version=1)
        v1.status = ModelStatus.CHAMPION
        add_variant(session, v1, "torch-fp32")
        add_variant(session, v1, "onnx-fp32", passed=False, auc_delta=-0.3)
        add_variant(session, v1, "onnx-int8", auc_delta=-0.001, images_per_second=5000)

    assert main(["model", "serve", TASK, "1", "--runtime", "onnx-int8"]) == 0
    assert (
        "pneumonia-cxr:v1 scores with onnx-int8, instead of torch-fp32" in capsys.readouterr().out
    )
    assert main(["model", "list", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["serving"] == "onnx-int8"
    assert [(v["runtime"], v["passed"], v["serving"]) for v in row["variants"]] == [
        ("torch-fp32", True, False),
        ("onnx-fp32", False, False),
        ("onnx-int8", True, True),
    ]
    assert main(["model", "list"]) == 0
    listed = capsys.readouterr().out
    assert "onnx-int8" in listed and "serving" in listed and "-0.3000" in listed

    # A refused variant and an unknown runtime: exit status 2 and the way out.
    assert main(["model", "serve", TASK, "1", "--runtime", "onnx-fp32"]) == 2
    assert "may not serve" in capsys.readouterr().err
    assert main(["model", "serve", TASK, "1", "--runtime", "tensorflow"]) == 2
    assert "runtimes are torch-fp32, onnx-fp32, onnx-int8" in capsys.readouterr().err

    assert main(["model", "rollback", TASK, "--serving"]) == 0
    assert "serves torch-fp32 again" in capsys.readouterr().out
    assert main(["model", "rollback", TASK, "--serving"]) == 2
    assert "no earlier choice of runtime" in capsys.readouterr().err
    with session_factory() as session:
        trail = session.execute(
            select(AuditEvent.actor, AuditEvent.action, AuditEvent.object_id)
            .where(AuditEvent.action.in_(["serve", "serve-rollback"]))
            .order_by(AuditEvent.id)
        ).all()
    assert [tuple(e) for e in trail] == [
        (f"os:{os_user()}", "serve", f"{TASK}:v1"),  # the operating-system user acts
        (f"os:{os_user()}", "serve-rollback", f"{TASK}:v1"),
    ]
