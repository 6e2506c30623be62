"""Real DICOM peers for the receiver tests (DCMTK storescu/echoscu), started as subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

AE_TITLE = "RADFLOW"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def tool(path: str) -> str:
    """A Debian tool's path; skip (fail under CI) when it is not installed."""
    if Path(path).exists():
        return path
    message = f"{path} is missing: apt-get install dcmtk orthanc orthanc-dicomweb"
    if in_ci():
        pytest.fail(f"CI=true, so the DICOM peers must run, but {message}", pytrace=False)
    pytest.skip(message)


def peer_env() -> dict[str, str]:
    # Debian's DCMTK leaves Nagle's algorithm on without it: ~45 ms per instance.
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu(
    port: int, files: Sequence[Path], *options: str, aet: str = "STORESCU"
) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu sending ``files`` to the receiver on ``port`` (verbose, all output kept)."""
    command = [tool("/usr/bin/storescu"), "-v", "-aet", aet, "-aec", AE_TITLE, *options]
    command += ["127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(
        command, env=peer_env(), capture_output=True, text=True, timeout=120, check=False
    )


def echoscu(port: int, *options: str, aet: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
    """DCMTK echoscu (a C-ECHO) to the receiver on ``port``, with DCMTK ``options``."""
    command = [tool("/usr/bin/echoscu"), "-aet", aet, "-aec", AE_TITLE, *options]
    command += ["127.0.0.1", str(port)]
    return subprocess.run(
        command, env=peer_env(), capture_output=True, text=True, timeout=30, check=False
    )


def copy_files(files: Sequence[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(f, folder / f"{i:04d}.dcm")) for i, f in enumerate(files)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    """An Orthanc PACS (Debian package) on loopback ports, storage in ``folder``; a context manager.

    ``modalities`` maps a name to (AE title, port) of DICOM peers on 127.0.0.1 it may send to;
    ``check_called_aet``: refuse associations that call another AE title than ``ORTHANC``;
    ``dicomweb``: load the DICOMweb plugin (Debian orthanc-dicomweb), STOW-RS at :attr:`stow_url`.
    """

    def __init__(
        self,
        folder: Path,
        modalities: dict[str, tuple[str, int]] | None = None,
        *,
        check_called_aet: bool = False,
        dicomweb: bool = False,
    ) -> None:
        self.folder = folder
        self.dicom_port, self.http_port = free_port(), free_port()
        self.aet = "ORTHANC"
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "radflow-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": check_called_aet,
            "Plugins": [tool(DICOMWEB_PLUGIN)] if dicomweb else [],
            "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
            "DicomModalities": {
                name: [aet, "127.0.0.1", port] for name, (aet, port) in (modalities or {}).items()
            },
        }
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps(config))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def stow_url(self) -> str:
        return f"{self.url}/dicom-web/studies"

    def __enter__(self) -> Orthanc:
        log = (self.folder / "orthanc.log").open("wb")
        self.process = subprocess.Popen(
            [tool("/usr/sbin/Orthanc"), str(self.config)],
            env=peer_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                self.request("GET", "/system")
                return self
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.2)
        self.__exit__(None, None, None)
        raise RuntimeError(f"Orthanc did not start; see {self.folder / 'orthanc.log'}")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def request(self, method: str, path: str, body: bytes | None = None) -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        with urllib.request.urlopen(req, timeout=120) as response:
            return json.loads(response.read() or b"null")


def radflow_env(settings: Any) -> dict[str, str]:
    """``settings`` as the RADFLOW_* environment of a ``radflow`` subprocess."""
    env = {k: v for k, v in peer_env().items() if not k.startswith("RADFLOW_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        secret = getattr(value, "get_secret_value", None)
        value = secret() if secret else value
        env[f"RADFLOW_{name.upper()}"] = (
            json.dumps(value) if isinstance(value, list) else str(value)
        )
    return env


def wait_for_port(port: int, process: subprocess.Popen[Any], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the process exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")
