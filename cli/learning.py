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
    p = add("label", cmd_label, "record a label for a study, or a CSV file of them (--csv)")
    p.add_argument("study_uid", nargs="?")
    p.add_argument("value", nargs="?")
    p.add_argument("--task", default=None, help=TASK_HELP)
    p.add_argument(
        "--csv",
        type=Path,
        default=None,
        help="a CSV file with columns study_uid,value (optional: task, split, comment), one "
        "label per row, all recorded in one transaction",
    )
    p = add("training", cmd_training_list, "training runs: list them, abandon a stuck one")
    sub_training = p.add_subparsers(required=True, metavar="ACTION")
    q = sub_training.add_parser("list", help="the newest training runs, with who holds each task")
    q.set_defaults(command=cmd_training_list)
    q.add_argument("--task", default=None, help="only this task")
    q.add_argument("--json", action="store_true")
    q = sub_training.add_parser(
        "abandon", help="end a stuck training run and free its task (audited)"
    )
    q.set_defaults(command=cmd_training_abandon)
    q.add_argument("run_id", type=int)
    q.add_argument("--reason", default="abandoned by hand")
    p = add("train", cmd_train, "train a new model version on the labelled studies")
    p.add_argument("--task", default=None, help=TASK_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = add("process", cmd_process, "score stable studies with each task's champion")
    p.add_argument(
        "--task", default=None, help="only this task (default: every task with a champion)"
    )
    p = add(
        "import",
        cmd_import,
        "import a labelled dataset as DICOM studies: a MedMNIST npz file, or a segmentation "
        "folder with a dataset.json (Medical Segmentation Decathlon layout)",
    )
    p.add_argument("format", choices=["npz", "segmentation"], help="dataset format")
    p.add_argument("file", type=Path, help="the npz file, or the segmentation dataset's folder")
    p.add_argument(
        "--list",
        dest="which",
        choices=["training", "test"],
        default="training",
        help="segmentation: which list of dataset.json to import (default training)",
    )
    p.add_argument("--task", default=None, help=TASK_HELP)
    p.add_argument("--splits", default=None, help="comma-separated, e.g. train,val (default all)")
    p.add_argument("--unlabeled", action="store_true", help="studies only, no labels")

    p = add("retrain", cmd_retrain, "train a task again (with --if-due: only if enough new labels)")
    p.add_argument("--task", default=None, help=TASK_HELP)
    p.add_argument(
        "--if-due", action="store_true", help="only when retrain_after_labels is reached"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    model = add(
        "model", cmd_model_list, "the model registry: list, promote, rollback, compress, serve"
    )
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
    q.add_argument(
        "--serving",
        action="store_true",
        help="instead: serve again the runtime the champion served before the last `serve`",
    )
    q = action(
        "compress",
        cmd_model_compress,
        "make a version's ONNX fp32 and int8 variants and judge them on the evaluation set",
    )
    q.add_argument("task")
    q.add_argument("version", type=int)
    q = action("serve", cmd_model_serve, "choose the runtime a version scores in (audited)")
    q.add_argument("task")
    q.add_argument("version", type=int)
    q.add_argument(
        "--runtime",
        required=True,
        help="torch-fp32 (the version's weights), or a variant that passed its check: "
        "onnx-fp32, onnx-int8 (`radflow model list` shows them)",
    )
    q = action("export", cmd_model_export, "write a version as a MONAI bundle folder")
    q.add_argument("task")
    q.add_argument("version", type=int)
    q.add_argument("folder", type=Path)
    q = action("import", cmd_model_import, "register a MONAI bundle folder as a new version")
    q.add_argument("folder", type=Path)
    q.add_argument("--task", default=None, help=TASK_HELP)


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    from radflow.ingest.importers import import_npz
    from radflow.ingest.msd import import_segmentation
    from radflow.runtime import Runtime

    settings.require_pseudonym_key()
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    actor = _actor(args, settings)
    with Runtime.open(settings) as rt:
        if args.format == "segmentation":
            report = import_segmentation(
                settings,
                rt.session_factory,
                rt.store,
                args.file,
                task_name(args),
                which=args.which,
                unlabeled=args.unlabeled,
                actor=actor,
            )
            print(f"imported {report.dataset}: {report.summary()}")
            return 0
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
    from radflow.learning.variants import serving_runtime, variants_of

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
        "serving": serving_runtime(session, version).value,
        "variants": [_variant_row(v) for v in variants_of(session, version)],
    }


def _variant_row(variant: Any) -> dict[str, Any]:
    metrics = variant.metrics
    return {
        "runtime": variant.runtime.value,
        "size_mb": round(variant.size_bytes / 1e6, 3),
        "images_per_second": metrics.get("images_per_second"),
        "speedup": metrics.get("speedup"),
        "auc": metrics.get("auc"),
        "auc_delta": metrics.get("auc_delta"),
        "passed": variant.passed,
        "serving": variant.serving,
        "why": variant.reason,
    }


def _print_variants(rows: list[dict[str, Any]], indent: str = "  ") -> None:
    for row in rows:
        delta = row["auc_delta"]
        speed = row["images_per_second"]
        print(
            f"{indent}{row['runtime']:<11} {row['size_mb']:>8.2f} MB "
            f"{(f'{speed:,.0f} img/s' if speed else '-'):>12} "
            f"AUC {(f'{delta:+.4f}' if delta is not None else '-'):>8} "
            f"{'serving' if row['serving'] else ('passed' if row['passed'] else 'refused'):<8} "
            f"{row['why']}"
        )


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
        _print_variants(row["variants"])
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
    from radflow.learning.variants import rollback_serving
    from radflow.runtime import Runtime

    task = task_name(args)
    actor = _actor(args, settings)
    with Runtime.open(settings) as rt, rt.transaction() as session:
        if args.serving:
            runtime = rollback_serving(session, task, actor=actor)
            print(f"rolled back: the champion of {task} serves {runtime} again")
            return 0
        restored = rollback(session, task, actor=actor).name
    print(f"rolled back: {restored} is the champion of {task} again")
    return 0


def cmd_model_compress(args: argparse.Namespace, settings: Settings) -> int:
    from radflow.db import VariantRuntime
    from radflow.learning.compression import compress
    from radflow.runtime import Runtime

    task = task_name(args)
    actor = _actor(args, settings)
    with Runtime.open(settings) as rt:
        variants = compress(settings, rt.session_factory, rt.store, task, args.version, actor=actor)
        rows = [_variant_row(v) for v in variants]
    print(f"{task}:v{args.version} variants on the evaluation set:")
    _print_variants(rows)
    if any(row["passed"] for row in rows if row["runtime"] != VariantRuntime.TORCH_FP32):
        print(f"serve one with `radflow model serve {task} {args.version} --runtime RUNTIME`")
    return 0


def cmd_model_serve(args: argparse.Namespace, settings: Settings) -> int:
    from cli.actor import principal
    from radflow.learning.registry import get_version
    from radflow.runtime import Runtime
    from radflow.services.models import serve

    task = task_name(args)
    actor = principal(args, settings)
    with Runtime.open(settings) as rt, rt.transaction() as session:
        previous = serve(session, actor, task, args.version, args.runtime)
        version = get_version(session, task, args.version)
        name, champion = version.name, version.status == "champion"
    when = "" if champion else " (once it is the champion)"
    print(f"{name} scores with {args.runtime}{when}, instead of {previous}")
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
    from flows.process import process_and_deliver

    with run_settings():
        result = process_and_deliver(args.task)
    print(json.dumps(result, default=str))
    return 0


def cmd_label(args: argparse.Namespace, settings: Settings) -> int:
    from cli.actor import principal
    from radflow.learning.labels import add_label, import_labels
    from radflow.runtime import Runtime
    from radflow.services.users import Permission, require

    if args.csv is None and (args.study_uid is None or args.value is None):
        raise ValueError("give STUDY_UID VALUE, or --csv FILE for many labels at once")
    default = task_name(args)
    # The author is who runs the command (or proves who they are with --as), never a claim.
    actor = principal(args, settings)
    require(actor, Permission.REVIEW)
    with Runtime.open(settings) as rt:
        with rt.transaction() as session:
            if args.csv is not None:
                counts = import_labels(session, args.csv, default, author=actor.name)
            else:
                add_label(
                    session, args.study_uid, default, args.value, source="cli", author=actor.name
                )
                counts = {default: 1}
        for task, count in counts.items():
            print(
                f"labelled {count} studies for {task} as {actor.name}"
                if args.csv
                else f"labelled {args.study_uid} {task}={args.value} as {actor.name}"
            )
        _labels_recorded(counts, rt)
    return 0


def _labels_recorded(counts: dict[str, int], rt: Any) -> None:
    # Retraining starts by itself once enough labels have arrived (flows/launcher.py). With a
    # Prefect server that is one event per label; without, a due check here. Imported only
    # now: Prefect's import is most of a label command's time.
    from flows.launcher import labels_recorded

    for task, count in counts.items():
        result = labels_recorded(task, count, rt=rt)
        if isinstance(result, dict):
            print(
                f"{task} was due for retraining: trained {result['model']} "
                f"({result['status']}): {result.get('decision', '')}"
            )


def cmd_training_list(args: argparse.Namespace, settings: Settings) -> int:
    from radflow import leases
    from radflow.learning.retrain import lease_name, training_runs
    from radflow.runtime import Runtime

    with Runtime.open(settings) as rt, rt.session_factory() as session:
        runs = training_runs(session, getattr(args, "task", None))
        holders = {run.task: leases.read(session, lease_name(run.task)) for run in runs}
        rows = [
            {
                "id": run.id,
                "task": run.task,
                "status": run.status,
                "started": run.started_at.isoformat(timespec="seconds"),
                "finished": run.finished_at.isoformat(timespec="seconds")
                if run.finished_at
                else None,
                "error": run.error,
                "lease": holders[run.task].describe()
                if run.status == "running" and holders[run.task] is not None
                else None,
            }
            for run in runs
        ]
    if getattr(args, "json", False):
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no training runs yet")
    for row in rows:
        line = f"{row['id']:>5} {row['task']:<20} {row['status']:<10} started {row['started']}"
        if row["lease"]:
            line += f"  lease: {row['lease']}"
        elif row["status"] == "running":
            line += "  no live lease: its process died (it is abandoned at the next training)"
        if row["error"]:
            line += f"  ({row['error']})"
        print(line)
    return 0


def cmd_training_abandon(args: argparse.Namespace, settings: Settings) -> int:
    from radflow.learning.retrain import abandon
    from radflow.runtime import Runtime

    with Runtime.open(settings) as rt, rt.transaction() as session:
        run = abandon(session, args.run_id, actor=_actor(args, settings), reason=args.reason)
        task = run.task
    print(f"training run {args.run_id} of {task} abandoned; the next training of {task} may start")
    return 0
