"""The learning-loop commands of ``radflow``: label, train, process, import, retrain, model.

Thin callers, like the rest of the CLI: each builds the runtime from the settings it is given
and calls a radflow function or a flow. ``--task`` defaults to the task registry's default
(radflow.learning.tasks.default_task); no command names a task itself.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from radflow.settings import Settings

Add = Callable[[str, Callable[..., int], str], argparse.ArgumentParser]
TASK_HELP = "the task (default: the task registry's default, see `radflow settings`)"


def _actor(args: argparse.Namespace, settings: Settings) -> str:
    from cli.actor import principal

    return principal(args, settings).name


def task_name(args: argparse.Namespace) -> str:
    """The task a command works on: ``--task``, else the registry's default."""
    name = getattr(args, "task", None)
    if name:
        return str(name)
    from radflow.learning.tasks import default_task

    return default_task().name


def add_commands(add: Add) -> None:
    p = add("label", cmd_label, "record a label for a study")
    p.add_argument("study_uid")
    p.add_argument("value")
    p.add_argument("--task", default=None, help=TASK_HELP)
    p = add("train", cmd_train, "train a new model version on the labelled studies")
    p.add_argument("--task", default=None, help=TASK_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = add("process", cmd_process, "score stable studies with each task's champion")
    p.add_argument(
        "--task", default=None, help="only this task (default: every task with a champion)"
    )
    p = add("import", cmd_import, "import a labelled dataset (MedMNIST npz) as DICOM studies")
    p.add_argument("format", choices=["npz"], help="dataset format")
    p.add_argument("file", type=Path)
    p.add_argument("--task", default=None, help=TASK_HELP)
    p.add_argument("--splits", default=None, help="comma-separated, e.g. train,val (default all)")
    p.add_argument("--unlabeled", action="store_true", help="studies only, no labels")

    p = add("retrain", cmd_retrain, "train a task again (with --if-due: only if enough new labels)")
    p.add_argument("--task", default=None, help=TASK_HELP)
    p.add_argument(
        "--if-due", action="store_true", help="only when retrain_after_labels is reached"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    model = add("model", cmd_model_list, "the model registry: list, promote, rollback, bundles")
    sub = model.add_subparsers(required=True, metavar="ACTION")

    def action(name: str, func: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=help_text, description=help_text)
        q.set_defaults(command=func)
        return q

    q = action("list", cmd_model_list, "every version of a task, with why it is (not) champion")
    q.add_argument("--task", default=None, help=TASK_HELP)
    q.add_argument("--json", action="store_true")
    q = action("promote", cmd_model_promote, "make a version the champion (audited)")
    q.add_argument("task")
    q.add_argument("version", type=int)
    q.add_argument(
        "--reason",
        default=None,
        help="why (required when the version did not beat the champion in its DeLong test)",
    )
    q = action("rollback", cmd_model_rollback, "restore the champion the current one replaced")
    q.add_argument("task")
    q = action("export", cmd_model_export, "write a version as a MONAI bundle folder")
    q.add_argument("task")
    q.add_argument("version", type=int)
    q.add_argument("folder", type=Path)
    q = action("import", cmd_model_import, "register a MONAI bundle folder as a new version")
    q.add_argument("folder", type=Path)
    q.add_argument("--task", default=None, help=TASK_HELP)


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    from radflow.ingest.importers import import_npz
    from radflow.runtime import Runtime

    settings.require_pseudonym_key()
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    actor = _actor(args, settings)
    with Runtime.open(settings) as rt:
        report = import_npz(
            settings,
            rt.session_factory,
            rt.store,
            args.file,
            task_name(args),
            splits=splits,
            unlabeled=args.unlabeled,
            actor=actor,
        )
    print(f"imported {report.dataset}: {report.summary()}")
    return 0


def cmd_retrain(args: argparse.Namespace, settings: Settings) -> int:
    from flows.embedded import run_settings
    from flows.train import train_flow

    with run_settings():
        result = train_flow(task_name(args), progress=not args.no_progress, if_due=args.if_due)
    print(json.dumps(result, default=str))
    return 0


def _version_row(session: Any, version: Any) -> dict[str, Any]:
    from radflow.learning.registry import latest_evaluation

    evaluation = latest_evaluation(session, version)
    return {
        "model": version.name,
        "status": str(version.status),
        "created": version.created_at.isoformat(timespec="seconds"),
        "auc": version.metrics.get("auc"),
        "threshold": round(version.threshold, 4),
        "parent": version.parent_id,
        "training_run": version.training_run_id,
        "code_version": version.code_version,
        "why": evaluation.reason if evaluation else version.metrics.get("decision", ""),
    }


def cmd_model_list(args: argparse.Namespace, settings: Settings) -> int:
    from radflow.learning.registry import versions
    from radflow.runtime import Runtime

    task = task_name(args)
    with Runtime.open(settings) as rt, rt.session_factory() as session:
        rows = [_version_row(session, v) for v in versions(session, task)]
    if getattr(args, "json", False):
        print(json.dumps(rows))
        return 0
    if not rows:
        print(f"{task} has no model versions yet: `radflow train --task {task}`")
    for row in rows:
        auc = f"{row['auc']:.4f}" if isinstance(row["auc"], float) else "-"
        print(f"{row['model']:<24} {row['status']:<10} AUC {auc}  {row['why']}")
    return 0


def cmd_model_promote(args: argparse.Namespace, settings: Settings) -> int:
    from cli.actor import principal
    from radflow.runtime import Runtime
    from radflow.services.models import promote

    actor = principal(args, settings)
    with Runtime.open(settings) as rt, rt.transaction() as session:
        name = promote(session, actor, task_name(args), args.version, args.reason).name
    print(f"{name} is now the champion of {task_name(args)}")
    return 0


def cmd_model_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from radflow.learning.registry import rollback
    from radflow.runtime import Runtime

    actor = _actor(args, settings)
    with Runtime.open(settings) as rt, rt.transaction() as session:
        restored = rollback(session, task_name(args), actor=actor).name
    print(f"rolled back: {restored} is the champion of {task_name(args)} again")
    return 0


def cmd_model_export(args: argparse.Namespace, settings: Settings) -> int:
    from radflow.learning.bundle import export_bundle
    from radflow.runtime import Runtime

    actor = _actor(args, settings)
    with Runtime.open(settings) as rt, rt.transaction() as session:
        export_bundle(session, rt.store, task_name(args), args.version, args.folder, actor=actor)
    print(f"exported {task_name(args)}:v{args.version} as a MONAI bundle in {args.folder}")
    return 0


def cmd_model_import(args: argparse.Namespace, settings: Settings) -> int:
    from radflow.learning.bundle import import_bundle
    from radflow.runtime import Runtime

    actor = _actor(args, settings)
    with Runtime.open(settings) as rt, rt.transaction() as session:
        version = import_bundle(session, rt.store, args.folder, task_name(args), actor=actor)
        name, status = version.name, version.status
    print(f"imported {args.folder} as {name} ({status})")
    return 0


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from flows.embedded import run_settings
    from flows.train import train_flow

    with run_settings():
        result = train_flow(task_name(args), progress=not args.no_progress)
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
    from cli.actor import principal
    from flows.launcher import labels_recorded
    from radflow.learning.labels import add_label
    from radflow.runtime import Runtime
    from radflow.services.users import Permission, require

    task = task_name(args)
    # The author is who runs the command (or proves who they are with --as), never a claim.
    actor = principal(args, settings)
    require(actor, Permission.REVIEW)
    with Runtime.open(settings) as rt:
        with rt.transaction() as session:
            add_label(session, args.study_uid, task, args.value, source="cli", author=actor.name)
        print(f"labelled {args.study_uid} {task}={args.value} as {actor.name}")
        # Retraining starts by itself once enough labels have arrived (flows/launcher.py).
        result = labels_recorded(task, rt=rt)
    if isinstance(result, dict):
        print(
            f"{task} was due for retraining: trained {result['model']} "
            f"({result['status']}): {result.get('decision', '')}"
        )
    return 0
