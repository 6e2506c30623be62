"""The ``radflow`` command: parses arguments, sets up logging, runs one command.

Commands are thin callers of flows (flows/) and of the core library (radflow), grouped by what
they are about: ``cli.ingest`` (getting studies in), ``cli.learning`` (labels, training,
scoring, the model registry) and ``cli.admin`` (the schema, users, services, the demo). Heavy
modules are imported inside each command, so ``radflow --help`` and ``radflow status`` start fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from cli import admin, ingest, learning
from radflow.errors import RadflowError
from radflow.settings import Settings

logger = logging.getLogger("radflow")

# Defaults for the embedded Prefect server; an operator's own PREFECT_* variables win. Telemetry
# would only log an ERROR on a closed hospital network.
PREFECT_DEFAULTS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}

Command = Callable[[argparse.Namespace, Settings], int]


def main(argv: Sequence[str] | None = None) -> int:
    # Files and folders Radflow creates (database, objects, spool, inbox, keys, logs) are the
    # service user's alone: 0600/0700, not the usual world-readable 0644/0755.
    os.umask(0o077)
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    parser = _parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    command: Command = args.command
    settings = None  # a bad setting fails Settings() itself
    try:
        settings = Settings()
        return command(args, settings)
    except (RadflowError, LookupError, ValueError, FileNotFoundError) as exc:
        if settings is not None:
            _audit_refusal(settings, exc, args.command_name)
        print(f"radflow {args.command_name}: error: {exc}", file=sys.stderr)
        return 2


def _audit_refusal(settings: Settings, error: Exception, command: str) -> None:
    """A command refused for the acting user's role is in the audit trail, like a page."""
    # Imported here, not at the top: `radflow --help` must not load the whole core.
    from radflow.services.users import PermissionDenied

    if not isinstance(error, PermissionDenied):
        return
    from radflow.runtime import Runtime
    from radflow.services.audit import note_denied

    with Runtime.open(settings) as rt, rt.transaction() as session:
        note_denied(session, error, f"command:{command}")


def configure_logging(verbose: bool) -> None:
    """Radflow's own messages at INFO; libraries (httpx, alembic, ...) only when they warn."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    level = logging.DEBUG if verbose else logging.INFO
    for name in ("radflow", "flows", "cli", "demo"):
        logging.getLogger(name).setLevel(level)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radflow", description="Radflow imaging AI platform")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--as",
        dest="as_user",
        metavar="USER",
        default=None,
        help="act as this dashboard user (asks for the password; read from stdin when it is "
        "not a terminal) instead of as the operating-system user; recorded in the audit trail",
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    def add(name: str, func: Command, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(command=func, command_name=name)
        return p

    ingest.add_commands(add)
    learning.add_commands(add)
    admin.add_commands(add)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
