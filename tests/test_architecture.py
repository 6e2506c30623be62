"""The architecture's rules hold: layers point down (import-linter contracts in pyproject.toml),
and tasks are declared once, in the task registry."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from radflow.learning.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = {"radflow": "platform/radflow", "flows": "flows", "dashboard": "dashboard"}
PACKAGES |= {"cli": "cli", "demo": "demo"}


def _lint_imports(
    root: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_import_contracts_are_kept() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "bad_import"),
    [
        ("platform/radflow/settings.py", "import flows.launcher"),  # the core importing up
        ("platform/radflow/learning/scoring.py", "import prefect"),  # Prefect outside flows
        ("dashboard/views/study.py", "import flows.train"),  # a page starting a flow itself
        ("dashboard/views/study.py", "import radflow.db"),  # a page around the services
    ],
)
def test_a_wrong_way_import_breaks_the_contracts(
    tmp_path: Path, module: str, bad_import: str
) -> None:
    """What `make lint` does when someone adds a wrong arrow: it fails and names it."""
    for package, folder in PACKAGES.items():
        shutil.copytree(ROOT / folder, tmp_path / "src" / package)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    package, _, rest = module.removeprefix("platform/").partition("/")
    target = tmp_path / "src" / package / rest
    target.write_text(target.read_text() + f"\n{bad_import}  # noqa\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}
    result = _lint_imports(tmp_path, env)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout or "broken" in result.stdout


def test_no_caller_names_a_task() -> None:
    """Tasks are declared once (radflow/learning/tasks/); flows, the CLI, the dashboard, the
    demo and the rest of the core look them up in the registry instead of naming them."""
    declared = ROOT / "platform" / "radflow" / "learning" / "tasks"
    offenders = []
    for folder in ("platform/radflow", "flows", "dashboard", "cli", "demo"):
        for path in (ROOT / folder).rglob("*.py"):
            if declared in path.parents:
                continue
            text = path.read_text()
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in TASKS if f'"{n}"' in text]
    assert not offenders, offenders


def test_the_receiver_and_status_stay_light() -> None:
    """The receiver process (and `radflow status`) never loads PyTorch or MONAI: they would
    triple its memory (tests/ingest/receiver/test_peers.py bounds its peak RSS)."""
    code = (
        "import sys, cli.ingest, flows.trigger, radflow.ingest.receiver, radflow.services.status;"
        "print(sorted(m for m in ('torch', 'monai', 'streamlit') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"
