"""Commands that run and administer Radflow: migrate, user, settings, worker, dashboard, demo."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from types import FrameType

from radflow.settings import Settings

Add = Callable[[str, Callable[[argparse.Namespace, Settings], int], str], argparse.ArgumentParser]


def add_commands(add: Add) -> None:
    add("migrate", cmd_migrate, "bring the database schema to the latest revision")
    p = add("user", cmd_user, "manage dashboard users")
    user_sub = p.add_subparsers(required=True, metavar="ACTION", dest="user_action")
    p = user_sub.add_parser("add", help="add a dashboard user (asks for the password)")
    p.add_argument("name")
    p.add_argument("--role", required=True, help="radiologist, ml-engineer or admin")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add("settings", cmd_settings, "print the effective settings (secrets masked)")
    p = add("worker", cmd_worker, "serve the flows as Prefect deployments (needs a Prefect server)")
    p.add_argument(
        "--pool",
        choices=["all", "process", "train"],
        default="all",
        help="the deployments to serve: process (ingest, scoring), train (training, the GPU "
        "machine) or all (default)",
    )
    p = add("dashboard", cmd_dashboard, "serve the review dashboard")
    p.add_argument("--port", type=int, default=None)
    p = add("demo", cmd_demo, "synthetic studies through the whole platform, then the dashboard")
    p.add_argument("--studies", type=int, default=300)
    p.add_argument("--label-fraction", type=float, default=0.6)
    p.add_argument("--no-serve", action="store_true", help="stop after scoring")


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from radflow.db import upgrade

    upgrade(settings.database_url)
    print("database schema is at the latest revision")
    return 0


def cmd_user(args: argparse.Namespace, settings: Settings) -> int:
    import getpass

    from radflow.runtime import Runtime
    from radflow.services.users import add_user, parse_role

    role = parse_role(args.role)  # before the prompt: a typo should not cost a password entry
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"Password for {args.name}: ")
        if getpass.getpass("Repeat the password: ") != password:
            raise ValueError("the passwords differ; nothing was changed")
    with Runtime.open(settings) as rt, rt.transaction() as session:
        add_user(session, args.name, role, password)
    print(f"added {role.value} {args.name}")
    return 0


def cmd_settings(args: argparse.Namespace, settings: Settings) -> int:
    print(settings.model_dump_json(indent=2))
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from flows.launcher import reconcile, require_server

    url = require_server()  # before anything else: without a server nothing would ever run
    from flows.deployments import serve_all
    from radflow.runtime import Runtime

    pool = args.pool

    def registered() -> None:
        # Whatever the database says is left (events lost while nothing listened, studies that
        # waited for a champion, due retrains) starts now, not at the next event or schedule.
        with Runtime.open(settings) as rt:
            reconcile(rt, scoring=pool != "train", training=pool != "process")
        print("radflow worker: deployments registered, serving", flush=True)

    print(
        f"radflow worker: pool {pool}, Prefect server {url}, asking for runs every "
        f"{settings.worker_poll_seconds:g} s",
        flush=True,
    )
    serve_all(settings, pool, registered=registered)
    return 0


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


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from demo.pipeline import run_demo, serving_receiver

    run_demo(settings, studies=args.studies, label_fraction=args.label_fraction)
    if args.no_serve:
        return 0
    with serving_receiver(settings):
        return cmd_dashboard(argparse.Namespace(port=None), settings)
