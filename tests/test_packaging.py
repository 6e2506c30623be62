"""Radflow installs like a package: a regular (non-editable) install works with no source tree,
and every distribution the code imports is declared in pyproject.toml."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import site
import socket
import subprocess
import sys
import time
import tomllib
import venv
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN = {"radflow", "flows", "dashboard", "cli", "demo"}
SOURCES = [ROOT / "platform" / "radflow", ROOT / "flows", ROOT / "dashboard", ROOT / "cli"]
SOURCES += [ROOT / "demo", ROOT / "migrations"]


def _imported_top_levels(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _declared() -> set[str]:
    """Normalised names of pyproject.toml's runtime dependencies (not the dev extra)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {
        _normalise(re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0])
        for requirement in project["dependencies"]
    }


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_distribution_is_declared() -> None:
    imported = set()
    for folder in SOURCES:
        for path in folder.rglob("*.py"):
            imported |= _imported_top_levels(path)
    # _typeshed: the standard library's stubs, imported under TYPE_CHECKING only (no module).
    stdlib = set(sys.stdlib_module_names) | {"__future__", "_typeshed"}
    third_party = imported - OWN - stdlib
    providers = packages_distributions()
    missing = {}
    for module in sorted(third_party):
        distributions = {_normalise(d) for d in providers.get(module, [module])}
        if not distributions & _declared():
            missing[module] = sorted(distributions)
    assert not missing, f"imported but not declared in pyproject.toml dependencies: {missing}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with Radflow installed from a wheel built from a copy of the tree.

    Its dependencies come from the test venv's site-packages (a plain path, so the editable
    install's finder there is never activated): installing torch & co. again would take
    minutes, and they are not what is being tested.
    """
    work = tmp_path_factory.mktemp("install")
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    source = work / "src"
    for name in filter(None, tracked):
        relative = Path(name.decode())
        if (ROOT / relative).is_file():
            (source / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / relative, source / relative)
    wheels = work / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
        check=True,
    )
    shutil.rmtree(source)  # nothing of the tree is left to fall back on
    env_dir = work / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    (next(env_dir.glob("lib/python*/site-packages")) / "deps.pth").write_text(
        "\n".join(site.getsitepackages()) + "\n"
    )
    (wheel,) = wheels.glob("radflow-*.whl")
    subprocess.run(
        [*pip, "--python", str(env_dir / "bin" / "python"), "install", "--no-deps", str(wheel)],
        check=True,
    )
    return env_dir


def _environment(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RADFLOW_", "PYTHON"))}
    env["RADFLOW_DATA_DIR"] = str(data_dir)
    env["RADFLOW_PSEUDONYM_KEY"] = "radflow-test-pseudonym-key-not-for-patient-data"
    return env


def test_a_regular_install_migrates_and_reports_status(installed: Path, tmp_path: Path) -> None:
    env = _environment(tmp_path / "data")
    python = str(installed / "bin" / "python")
    where = subprocess.run(
        [python, "-c", "import radflow.migrations, cli; print(radflow.migrations.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(installed)), where
    radflow = str(installed / "bin" / "radflow")
    run = {"cwd": tmp_path, "env": env, "capture_output": True, "text": True, "timeout": 120}
    migrated = subprocess.run([radflow, "migrate"], **run)  # type: ignore[call-overload]
    assert migrated.returncode == 0, migrated.stderr
    status = subprocess.run([radflow, "status", "--json"], **run)  # type: ignore[call-overload]
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout.strip().splitlines()[-1])["studies"] == 0


def test_a_regular_install_receives(installed: Path, tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = _environment(tmp_path / "data")
    receiver = subprocess.Popen(
        [str(installed / "bin" / "radflow"), "receive", "--port", str(port), "--host", "127.0.0.1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        deadline = time.monotonic() + 60
        while True:
            assoc = ae.associate("127.0.0.1", port, ae_title="RADFLOW")
            if assoc.is_established or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert assoc.is_established, "the installed receiver never accepted an association"
        status = assoc.send_c_echo()
        assoc.release()
        assert status.Status == 0x0000
    finally:
        receiver.send_signal(signal.SIGTERM)
        _, stderr = receiver.communicate(timeout=60)
    assert receiver.returncode == 0, stderr
