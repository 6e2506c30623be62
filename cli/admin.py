"""Commands that run and administer Radflow: migrate, user, settings, worker, dashboard, demo."""

from __future__ import annotations

import argparse
import os
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
    p = add("user", cmd_user, "manage dashboard users (audited, as the acting user)")
    user_sub = p.add_subparsers(required=True, metavar="ACTION", dest="user_action")
    p = user_sub.add_parser("add", help="add a dashboard user (asks for the password)")
    p.add_argument("name")
    p.add_argument("--role", required=True, help="radiologist, ml-engineer or admin")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    user_sub.add_parser("list", help="every user: role, active, password reset pending, throttled")
    for action, text in (
        ("deactivate", "stop a user from logging in (ends their open sessions)"),
        ("reactivate", "let a deactivated user log in again"),
        ("unlock", "clear a user's login waits after wrong passwords"),
    ):
        user_sub.add_parser(action, help=text).add_argument("name")
    p = user_sub.add_parser(
        "reset-password", help="set a temporary password; the user must change it at next login"
    )
    p.add_argument("name")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the temporary password from stdin (default: a random one, printed once)",
    )
    p = user_sub.add_parser("role", help="change a user's role (applies at their next click)")
    p.add_argument("name")
    p.add_argument("role", help="radiologist, ml-engineer or admin")
    p = add("audit", cmd_audit, "the audit trail: verify its hash chain")
    audit_sub = p.add_subparsers(required=True, metavar="ACTION", dest="audit_action")
    audit_sub.add_parser(
        "verify", help="check that no audit event was changed, removed or inserted"
    )
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
    p.add_argument("--studies", type=int, default=300, help="synthetic chest radiographs")
    p.add_argument(
        "--ct-studies",
        type=int,
        default=40,
        help="synthetic abdominal CT series (adrenal-ct-3d trains on 20 labelled or more)",
    )
    p.add_argument("--label-fraction", type=float, default=0.6)
    p.add_argument("--no-serve", action="store_true", help="stop after scoring")


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from radflow.db import upgrade

    upgrade(settings.database_url)
    print("database schema is at the latest revision")
    return 0


def cmd_user(args: argparse.Namespace, settings: Settings) -> int:
    from cli.actor import principal
    from radflow.runtime import Runtime
    from radflow.services import users

    action = args.user_action
    role = users.parse_role(args.role) if action in ("add", "role") else None
    # Before any prompt: a typo in the role should not cost a password entry.
    actor = principal(args, settings)
    policy = users.PasswordPolicy.from_settings(settings)
    password = _new_password(args) if action == "add" else None
    if action == "reset-password" and args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    with Runtime.open(settings) as rt, rt.transaction() as session:
        if action == "list":
            for row in users.list_users(session, actor):
                flags = [
                    f
                    for f, on in (
                        ("inactive", not row.active),
                        ("must-change-password", row.must_change_password),
                        ("throttled", row.throttled),
                    )
                    if on
                ]
                print(f"{row.name:<24} {row.role:<12} {' '.join(flags)}".rstrip())
            return 0
        if action == "add":
            assert password is not None and role is not None
            users.add_user(session, args.name, role, password, actor=actor, policy=policy)
            done = f"added {role.value} {args.name}"
        elif action in ("deactivate", "reactivate"):
            users.set_active(session, actor, args.name, action == "reactivate")
            done = f"{action}d {args.name}"
        elif action == "unlock":
            users.unlock(session, actor, args.name)
            done = f"cleared the login waits of {args.name}"
        elif action == "role":
            assert role is not None
            users.change_role(session, actor, args.name, role)
            done = f"{args.name} is now {role.value}"
        else:
            temporary = users.reset_password(session, actor, args.name, password, policy=policy)
            done = f"reset the password of {args.name}; they must change it at their next login"
            if password is None:
                done += f"\ntemporary password (shown once): {temporary}"
    print(done)
    return 0


def _new_password(args: argparse.Namespace) -> str:
    import getpass

    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    password = getpass.getpass(f"Password for {args.name}: ")
    if getpass.getpass("Repeat the password: ") != password:
        raise ValueError("the passwords differ; nothing was changed")
    return password


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    from radflow.runtime import Runtime
    from radflow.services.audit import verify_chain

    with Runtime.open(settings) as rt, rt.session_factory() as session:
        report = verify_chain(session)
    if report.intact:
        print(
            f"audit trail intact: {report.events} events, head {report.head_seq} {report.head_hash}"
        )
        print("keep the head hash elsewhere: a later verify that ends past it proves the past")
        return 0
    print(f"audit trail BROKEN ({report.events} events checked):", file=sys.stderr)
    for problem in report.problems:
        print(f"  {problem}", file=sys.stderr)
    return 1


def cmd_settings(args: argparse.Namespace, settings: Settings) -> int:
    print(settings.model_dump_json(indent=2))
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from flows.launcher import reconcile, require_server

    settings.require_pseudonym_key()  # its flows ingest and export studies: refused first
    url = require_server()  # without a server nothing would ever run
    from flows.deployments import serve_all
    from radflow.runtime import Runtime

    pool = args.pool

    def registered() -> None:
        # Whatever the database says is left (events lost while nothing listened, studies that
        # waited for a champion, due retrains) starts now, not at the next event or schedule;
        # the worker's own listener (flows/listener.py), when it has one, scores at once.
        scoring = pool != "train" and not settings.worker_listens
        with Runtime.open(settings) as rt:
            reconcile(rt, scoring=scoring, training=pool != "process")
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
    # server.py wraps app.py in the login gate and the security headers (dashboard/gate.py).
    app = Path(str(files("dashboard").joinpath("server.py")))
    tls = settings.dashboard_tls_cert_file is not None
    print(f"Radflow dashboard: http{'s' if tls else ''}://localhost:{port}", flush=True)
    options = {
        "server.headless": "true",
        "server.port": str(port),
        "server.fileWatcherType": "none",
        "browser.gatherUsageStats": "false",
        "browser.serverAddress": "localhost",
        # Patient data: no "download as CSV" on tables, no deploy button.
        "client.disableDataExport": "true",
        "client.toolbarMode": "viewer",
        # Nothing a page of Radflow needs: files served from a static folder, the agent API.
        "server.enableStaticServing": "false",
        "server.enableAgentApi": "false",
        "server.enableXsrfProtection": "true",
    }
    if tls:
        options["server.sslCertFile"] = str(settings.dashboard_tls_cert_file)
        options["server.sslKeyFile"] = str(settings.dashboard_tls_key_file)
    command = [sys.executable, "-m", "streamlit", "run", str(app)]
    command += [arg for name, value in options.items() for arg in (f"--{name}", value)]
    # Read by the server Streamlit runs on (uvicorn): whose forwarded headers to believe.
    env = {**os.environ, "FORWARDED_ALLOW_IPS": settings.dashboard_trusted_proxies}
    # SIGTERM (a service manager, `kill`) unwinds like Ctrl-C: subprocess.call then stops the
    # dashboard, and the demo's receiver is stopped on the way out, instead of both orphaned.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from demo.pipeline import ensure_demo_key, run_demo, serving_receiver

    settings = ensure_demo_key(settings)
    run_demo(
        settings,
        studies=args.studies,
        ct_studies=args.ct_studies,
        label_fraction=args.label_fraction,
    )
    if args.no_serve:
        return 0
    with serving_receiver(settings):
        return cmd_dashboard(argparse.Namespace(port=None), settings)
