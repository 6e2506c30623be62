"""The ``radflow`` command: a thin caller of flows and library functions."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from cli.learning import add_commands as add_learning_commands
from cli.learning import after_labels
from radflow.errors import RadflowError
from radflow.settings import Settings

if TYPE_CHECKING:
    from radflow.runtime import Runtime

logger = logging.getLogger("radflow")

DEFAULT_TASK = "pneumonia-cxr"
# `radflow ingest` ran to the end but refused some files (listed in its report): scripts can
# tell a partly refused folder from a clean one, and both from a command that failed (2).
EXIT_REJECTED = 3


# Defaults for the embedded Prefect server; an operator's own PREFECT_* variables win. Telemetry
# would only log an ERROR on a closed hospital network.
PREFECT_DEFAULTS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def main(argv: Sequence[str] | None = None) -> int:
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    parser = _parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    command: Callable[[argparse.Namespace, Settings], int] = args.command
    try:
        return command(args, Settings())
    except (RadflowError, LookupError, ValueError, FileNotFoundError) as exc:
        print(f"radflow {args.command_name}: error: {exc}", file=sys.stderr)
        return 2


def configure_logging(verbose: bool) -> None:
    """Radflow's own messages at INFO; libraries (httpx, alembic, ...) only when they warn."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radflow", description="Radflow imaging AI platform")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    def add(name: str, func: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(command=func, command_name=name)
        return p

    p = add("ingest", cmd_ingest, "ingest every DICOM file under a folder")
    p.add_argument("folder", type=Path)
    p.epilog = (
        "Every file is tried; the report lists each refused file with its reason. Exit status: "
        f"0 all stored (or already there), {EXIT_REJECTED} done but some files refused, "
        "2 the command could not run (say, no such folder), 1 it stopped on an outage "
        "(database or object store unreachable): run it again, nothing is stored twice."
    )
    p = add("train", cmd_train, "train a new model version on the labelled studies")
    p.add_argument("--task", default=DEFAULT_TASK)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = add("process", cmd_process, "score stable studies with the task's champion")
    p.add_argument("--task", default=DEFAULT_TASK)
    p = add("label", cmd_label, "record a label for a study")
    p.add_argument("study_uid")
    p.add_argument("value")
    p.add_argument("--task", default=DEFAULT_TASK)
    p.add_argument("--author", default=os.environ.get("USER", "cli"))
    p = add("status", cmd_status, "counts of studies by status, and the champion models")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("demo", cmd_demo, "synthetic studies through the whole platform, then the dashboard")
    p.add_argument("--studies", type=int, default=300)
    p.add_argument("--label-fraction", type=float, default=0.6)
    p.add_argument("--no-serve", action="store_true", help="stop after scoring")
    p = add("dashboard", cmd_dashboard, "serve the review dashboard")
    p.add_argument("--port", type=int, default=None)
    p = add("receive", cmd_receive, "run the DICOM receiver (C-ECHO/C-STORE SCP) and its indexer")
    p.add_argument("--port", type=int, default=None, help="default RADFLOW_RECEIVER_PORT (11112)")
    p.add_argument("--ae-title", default=None, help="default RADFLOW_RECEIVER_AE_TITLE (RADFLOW)")
    p.add_argument("--host", default=None, help="default RADFLOW_RECEIVER_HOST (0.0.0.0)")
    # A supervisor's worker (radflow.ingest.receiver.workers): its number and the shared socket.
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    p = add("watch", cmd_watch, "ingest files and zips dropped in the inbox (a polling loop)")
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p = add("export", cmd_export, "write de-identified copies of a study (PS3.15 Basic profile)")
    p.add_argument("study_uid")
    p.add_argument("out_dir", type=Path)
    add_learning_commands(add)  # import, retrain, model list/promote/rollback/export/import
    add("migrate", cmd_migrate, "bring the database schema to the latest revision")
    p = add("user", cmd_user, "manage dashboard users")
    user_sub = p.add_subparsers(required=True, metavar="ACTION", dest="user_action")
    p = user_sub.add_parser("add", help="add a dashboard user (asks for the password)")
    p.add_argument("name")
    p.add_argument("--role", required=True, help="radiologist, ml-engineer or admin")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add("worker", cmd_worker, "serve the flows as Prefect deployments (needs a Prefect server)")
    add("settings", cmd_settings, "print the effective settings (secrets masked)")
    return parser


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    from flows.embedded import run_settings
    from flows.ingest import ingest_flow

    with run_settings():
        result = ingest_flow(str(args.folder))
    rejected: dict[str, str] = result["rejected"]
    warnings: dict[str, list[str]] = result["warnings"]
    print(
        f"stored {result['stored']}, duplicates {result['duplicates']}, "
        f"rejected {len(rejected)}, stable studies {result['stable_studies']}"
    )
    for path, reason in rejected.items():
        print(f"  rejected {path}: {reason}")
    for path, dropped in warnings.items():
        print(f"  stored {path} without: {'; '.join(dropped)}")
    return EXIT_REJECTED if rejected else 0


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from flows.embedded import run_settings
    from flows.train import train_flow

    with run_settings():
        result = train_flow(args.task, progress=not args.no_progress)
    print(json.dumps(result, default=str))
    return 0


def cmd_process(args: argparse.Namespace, settings: Settings) -> int:
    from flows.embedded import run_settings
    from flows.process import process_flow

    with run_settings():
        result = process_flow(args.task)
    print(json.dumps(result, default=str))
    return 0


def cmd_label(args: argparse.Namespace, settings: Settings) -> int:
    from radflow.db import unit_of_work
    from radflow.learning.labels import add_label
    from radflow.runtime import Runtime

    with Runtime.open(settings) as rt, unit_of_work(rt.session_factory) as session:
        add_label(session, args.study_uid, args.task, args.value, source="cli", author=args.author)
    print(f"labelled {args.study_uid} {args.task}={args.value}")
    after_labels(args.task)  # retraining starts by itself once enough labels have arrived
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from radflow.runtime import Runtime
    from radflow.services.status import platform_status

    with Runtime.open(settings) as rt, rt.session_factory() as session:
        status = platform_status(session, settings)
    if args.json:
        print(json.dumps(status))
    else:
        for key, value in status.items():
            print(f"{key}: {value}")
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from demo import pipeline as demo
    from flows.embedded import run_settings
    from radflow.runtime import Runtime

    with run_settings():
        _demo_pipeline(args, settings)
    with Runtime.open(settings) as rt:
        for name, role, password in demo.create_demo_users(rt):
            print(f"Demo login ({role.value}): {name} / {password}")
    if args.no_serve:
        return 0
    with _demo_receiver(settings):
        return cmd_dashboard(argparse.Namespace(port=None), settings)


def _demo_pipeline(args: argparse.Namespace, settings: Settings) -> None:
    """Synthetic studies ingested, a share labelled, a model trained, every study scored."""
    from demo import pipeline as demo
    from flows.ingest import ingest_flow
    from flows.process import process_flow
    from flows.train import train_flow
    from radflow.runtime import Runtime

    folder = settings.data_dir / "demo-studies"
    print(f"Generating {args.studies} synthetic chest radiograph studies in {folder}")
    studies = demo.generate(folder, args.studies, settings.seed)
    ingest_flow(str(folder))
    with Runtime.open(settings) as rt:
        n = demo.label_training_subset(rt, studies, args.label_fraction, settings.seed)
        trained_before = demo.has_champion(rt)
    print(f"Labelled {n} studies as a radiologist would")
    if trained_before:
        print(f"{demo.TASK} already has a champion model; not training again")
    else:
        trained = train_flow(demo.TASK)
        print(f"Trained {trained['model']}: validation AUC {trained['auc']:.3f}")
    scored = process_flow(demo.TASK)
    print(f"Scored {scored['scored']} studies with {scored['model']}")


@contextmanager
def _demo_receiver(settings: Settings) -> Iterator[None]:
    """The DICOM receiver next to the demo dashboard, so a study sent to it shows up there."""
    port, host = settings.receiver_port, settings.receiver_host
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        print(f"DICOM receiver not started: port {port} is not free ({exc.strerror})")
        yield
        return
    receiver = subprocess.Popen([sys.executable, "-m", "cli.main", "receive"])
    print(
        f"DICOM receiver {settings.receiver_ae_title} on port {port}: "
        f"storescu -aec {settings.receiver_ae_title} localhost {port} FILE.dcm",
        flush=True,
    )
    try:
        yield
    finally:
        receiver.terminate()
        receiver.wait(60)


def cmd_dashboard(args: argparse.Namespace, settings: Settings) -> int:
    port = args.port or settings.dashboard_port
    app = Path(str(files("dashboard").joinpath("app.py")))
    print(f"Radflow dashboard: http://localhost:{port}", flush=True)
    options = {
        "server.headless": "true",
        "server.port": str(port),
        "server.fileWatcherType": "none",
        "browser.gatherUsageStats": "false",
        "browser.serverAddress": "localhost",
        # Patient data: no "download as CSV" on tables, no deploy button.
        "client.disableDataExport": "true",
        "client.toolbarMode": "viewer",
    }
    command = [sys.executable, "-m", "streamlit", "run", str(app)]
    command += [arg for name, value in options.items() for arg in (f"--{name}", value)]
    # SIGTERM (a service manager, `kill`) unwinds like Ctrl-C: subprocess.call then stops the
    # dashboard, and the demo's receiver is stopped on the way out, instead of both orphaned.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def cmd_receive(args: argparse.Namespace, settings: Settings) -> int:
    from radflow.ingest.receiver.service import serve, serve_worker
    from radflow.runtime import Runtime

    if args.worker is not None:  # started by a supervisor (radflow.ingest.receiver.workers)
        with Runtime.open(settings, migrate=False) as rt:
            serve_worker(
                settings,
                args.worker,
                args.listen_fd,
                session_factory=rt.session_factory,
                store=rt.store,
                ae_title=args.ae_title,
            )
        return 0
    from flows.trigger import stabilise_and_process

    with Runtime.open(settings) as rt:
        serve(
            settings,
            session_factory=rt.session_factory,
            store=rt.store,
            host=args.host,
            port=args.port,
            ae_title=args.ae_title,
            tick=lambda: _keep_serving(stabilise_and_process, rt),
        )
    return 0


def _keep_serving(step: Callable[[Runtime], object], rt: Runtime) -> None:
    """Run one periodic step of a long-lived service; a failure is logged, and retried next time.

    The receiver must keep accepting studies while, say, the database restarts or a flow run
    fails: the step's state lives in the database, so the next tick picks up where this one broke.
    """
    try:
        step(rt)
    except Exception:
        logger.exception("periodic %s failed; retrying on the next tick", step.__name__)


def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    from flows.trigger import stabilise_and_process
    from radflow.ingest.watch import watch_forever
    from radflow.runtime import Runtime

    with Runtime.open(settings) as rt:
        print(f"watching {settings.inbox} (quarantine: {settings.quarantine})", flush=True)
        try:
            watch_forever(
                settings,
                rt.session_factory,
                rt.store,
                lambda: stabilise_and_process(rt),
                passes=1 if args.once else None,
            )
        except KeyboardInterrupt:
            return 0
    return 0


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from radflow.dicom.deid import export_study
    from radflow.runtime import Runtime

    with Runtime.open(settings) as rt, rt.session_factory() as session:
        report = export_study(
            session,
            rt.store,
            args.study_uid,
            args.out_dir,
            settings.pseudonym_key.get_secret_value(),
        )
    print(f"wrote {len(report.written)} de-identified instances under {args.out_dir}")
    for uid, reason in report.refused.items():
        print(f"  not exported {uid}: {reason}")
    return 0


def cmd_user(args: argparse.Namespace, settings: Settings) -> int:
    import getpass

    from radflow.db import unit_of_work
    from radflow.runtime import Runtime
    from radflow.services.users import add_user, parse_role

    role = parse_role(args.role)  # before the prompt: a typo should not cost a password entry
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"Password for {args.name}: ")
        if getpass.getpass("Repeat the password: ") != password:
            raise ValueError("the passwords differ; nothing was changed")
    with Runtime.open(settings) as rt, unit_of_work(rt.session_factory) as session:
        add_user(session, args.name, role, password)
    print(f"added {role.value} {args.name}")
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from radflow.db import upgrade

    upgrade(settings.database_url)
    print("database schema is at the latest revision")
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from flows.deployments import serve_all

    serve_all()
    return 0


def cmd_settings(args: argparse.Namespace, settings: Settings) -> int:
    print(settings.model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
