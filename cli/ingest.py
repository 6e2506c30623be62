"""Commands that get studies in and out: ingest, receive, watch, export, status."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from radflow.settings import Settings

if TYPE_CHECKING:
    from radflow.runtime import Runtime

logger = logging.getLogger(__name__)

# `radflow ingest` ran to the end but refused some files (listed in its report): scripts can
# tell a partly refused folder from a clean one, and both from a command that failed (2).
EXIT_REJECTED = 3

Add = Callable[[str, Callable[[argparse.Namespace, Settings], int], str], argparse.ArgumentParser]


def add_commands(add: Add) -> None:
    p = add("ingest", cmd_ingest, "ingest every DICOM file under a folder")
    p.add_argument("folder", type=Path)
    p.epilog = (
        "Every file is tried; the report lists each refused file with its reason. Exit status: "
        f"0 all stored (or already there), {EXIT_REJECTED} done but some files refused, "
        "2 the command could not run (say, no such folder), 1 it stopped on an outage "
        "(database or object store unreachable): run it again, nothing is stored twice."
    )
    p = add("receive", cmd_receive, "run the DICOM receiver (C-ECHO/C-STORE SCP) and its indexer")
    p.add_argument("--port", type=int, default=None, help="default RADFLOW_RECEIVER_PORT (11112)")
    p.add_argument("--ae-title", default=None, help="default RADFLOW_RECEIVER_AE_TITLE (RADFLOW)")
    p.add_argument("--host", default=None, help="default RADFLOW_RECEIVER_HOST (0.0.0.0)")
    p = add("watch", cmd_watch, "ingest files and zips dropped in the inbox (a polling loop)")
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p = add("export", cmd_export, "write de-identified copies of a study (PS3.15 Basic profile)")
    p.add_argument("study_uid")
    p.add_argument("out_dir", type=Path)
    p.add_argument(
        "--recipient",
        default=None,
        help="keep pseudonyms and UIDs consistent across exports to this recipient (default: "
        "a new key for every export)",
    )
    p.add_argument(
        "--allow-unverified-burned-in",
        action="store_true",
        help="also export secondary capture, ultrasound, angiography and photographic images "
        "that do not say whether text is burned into the pixels (you checked them; audited)",
    )
    p = add("status", cmd_status, "counts of studies by status, and the champion models")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    settings.require_pseudonym_key()
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


def cmd_receive(args: argparse.Namespace, settings: Settings) -> int:
    settings.require_pseudonym_key()
    from flows.trigger import Handoff, stabilise_and_process
    from radflow.ingest.receiver.service import serve
    from radflow.runtime import Runtime

    with Runtime.open(settings) as rt:
        serve(
            settings,
            session_factory=rt.session_factory,
            store=rt.store,
            host=args.host,
            port=args.port,
            ae_title=args.ae_title,
            tick=_periodic(partial(stabilise_and_process, handoff=Handoff()), rt),
        )
    return 0


def _periodic(step: Callable[[Runtime], object], rt: Runtime) -> Callable[[], None]:
    """One periodic step of a long-lived service; a failure is logged and retried next time.

    The receiver must keep accepting studies while, say, the database restarts or a flow run
    fails: the step's state lives in the database, so the next tick picks up where this one
    broke. An outage is one line per tick; another failure shows its traceback once.
    """
    from radflow.outages import FailureLog

    failures = FailureLog(logger)

    def tick() -> None:
        try:
            step(rt)
        except Exception as exc:
            failures.failed(f"periodic {getattr(step, 'func', step).__name__}", exc)

    return tick


def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    settings.require_pseudonym_key()
    from flows.trigger import Handoff, stabilise_and_process
    from radflow.ingest.watch import watch_forever
    from radflow.runtime import Runtime

    with Runtime.open(settings) as rt:
        print(f"watching {settings.inbox} (quarantine: {settings.quarantine})", flush=True)
        try:
            watch_forever(
                settings,
                rt.session_factory,
                rt.store,
                partial(stabilise_and_process, rt, handoff=Handoff()),
                passes=1 if args.once else None,
            )
        except KeyboardInterrupt:
            return 0
    return 0


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    settings.require_pseudonym_key()
    from cli.actor import principal
    from radflow.dicom.deid import export_study
    from radflow.dicom.pseudonym import recipient_salt
    from radflow.runtime import Runtime

    actor = principal(args, settings)
    salt = recipient_salt(args.recipient) if args.recipient else None
    with Runtime.open(settings) as rt, rt.transaction() as session:
        report = export_study(
            session,
            rt.store,
            args.study_uid,
            args.out_dir,
            settings.pseudonym_key.get_secret_value(),
            actor=actor.name,
            salt=salt,
            allow_unverified_burned_in=args.allow_unverified_burned_in,
        )
    print(
        f"wrote {len(report.written)} de-identified instances under {args.out_dir} "
        f"(key id {report.key_id}; audited)"
    )
    for uid, reason in report.refused.items():
        print(f"  not exported {uid}: {reason}")
    if report.unverified_burned_in:
        print(
            f"  {len(report.unverified_burned_in)} exported without a burned-in annotation "
            "statement, as you asked (recorded in the audit trail)"
        )
    return 0 if not report.refused else 3


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
