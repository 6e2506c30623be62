"""Importing a segmentation dataset in the Medical Segmentation Decathlon layout.

A folder with a ``dataset.json`` whose ``training`` (or ``test``) list names, per case, an
``image``, a ``label`` mask and optionally a ``fov`` mask (the field of view: the pixels
evaluation counts, as DRIVE gives), read by radflow.learning.mask_files. Each mask is stored
(radflow.learning.masks) and recorded as an import label, with the list name as its split
("training" as "train"). Everything is deterministic in the files' content: importing again
stores nothing twice and adds no label twice.

- A 2D task: the image is a colour photograph (TIFF, PNG, JPEG...), which becomes a VL
  Photographic Image study (RGB, modality XC; radflow.dicom.writer.photograph_dataset), written
  as real DICOM and ingested through the front door; masks are pictures or NIfTI.
- A volume task (``segmentation-3d``): the image is the CT series itself, a folder of its DICOM
  files (or one multi-frame file), ingested as received files; the mask, a NIfTI (turned onto
  the series' grid by its affine) or a DICOM SEG over those files, is read against the series
  as the task routes and assembles it (radflow.dicom.geometry).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import Study, unit_of_work
from radflow.db.audit import record
from radflow.dicom.seg import load_sources
from radflow.dicom.writer import photograph_dataset
from radflow.ingest.importers import ImportReport, add_import_labels, ingest_written
from radflow.ingest.routing import route_studies, rules_for
from radflow.learning.mask_files import read_mask
from radflow.learning.masks import GroundTruth, save_mask
from radflow.learning.tasks import Task, get_task
from radflow.settings import Settings
from radflow.store import ObjectStore

logger = logging.getLogger(__name__)

LISTS = ("training", "test")


@dataclass(frozen=True)
class Case:
    image: Path
    label: Path | None
    fov: Path | None


def read_dataset(folder: Path, which: str) -> list[Case]:
    """The cases of list ``which`` of ``folder/dataset.json``, paths resolved and checked."""
    index = folder / "dataset.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{index} does not exist; give a folder with a dataset.json in the Medical "
            "Segmentation Decathlon layout"
        )
    if which not in LISTS:
        raise ValueError(f"the list to import is one of {LISTS}, not {which!r}")
    entries = json.loads(index.read_text()).get(which)
    if not entries:
        raise ValueError(f"{index} has no {which!r} list (or it is empty)")
    cases = []
    for entry in entries:
        item = {"image": entry} if isinstance(entry, str) else entry
        paths = {k: folder / str(item[k]) for k in ("image", "label", "fov") if item.get(k)}
        for name, path in paths.items():
            if not (path.is_file() or (name == "image" and path.is_dir())):
                raise FileNotFoundError(f"{index} names {name} {path}, which does not exist")
        cases.append(Case(paths["image"], paths.get("label"), paths.get("fov")))
    return cases


def _binary(path: Path, shape: tuple[int, int], what: str) -> NDArray[np.bool_]:
    return read_mask(path.name, path.read_bytes(), shape, what=what)


def _write(case: Case, out: Path) -> tuple[str, GroundTruth | None]:
    """The case's photograph as a DICOM file at ``out``; its study UID and ground truth."""
    data = case.image.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    pixels = np.asarray(Image.open(case.image).convert("RGB"), dtype=np.uint8)

    def uid(kind: str) -> str:
        return str(generate_uid(entropy_srcs=["radflow-msd-import", digest, kind]))

    patient = digest[:12].upper()  # a dataset photograph carries no identity: one per image
    ds = photograph_dataset(
        pixels,
        patient_id=f"IMP-{patient}",
        patient_name=f"IMPORT^{patient}",
        study_uid=uid("study"),
        series_uid=uid("series"),
        sop_instance_uid=uid("sop"),
        study_datetime=dt.datetime(2020, 1, 1),
    )
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    shape = (pixels.shape[0], pixels.shape[1])
    truth = None
    if case.label is not None:
        region = _binary(case.fov, shape, "field of view") if case.fov else None
        truth = GroundTruth(_binary(case.label, shape, "mask"), region)
    return str(ds.StudyInstanceUID), truth


def import_segmentation(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    folder: Path,
    task_name: str,
    *,
    which: str = "training",
    unlabeled: bool = False,
    actor: str = "radflow",
) -> ImportReport:
    """Import list ``which`` of ``folder/dataset.json`` as studies of ``task_name``, with their
    masks as labels (none with ``unlabeled``: a held-out test set is scored, never learnt)."""
    task = get_task(task_name)
    if not task.segmentation:
        raise ValueError(f"{task.name} is a {task.kind} task; import masks for a segmentation task")
    cases = read_dataset(folder, which)
    report = ImportReport(dataset=f"{folder.name}:{which}")
    if task.takes_series:
        _import_volumes(settings, session_factory, store, cases, folder, report)
        labelled = _volume_masks(settings, session_factory, store, task, cases, report, unlabeled)
        return _finish(session_factory, store, task, folder, which, report, labelled, actor)
    with tempfile.TemporaryDirectory(prefix="radflow-import-") as tmp:
        written = [_write(case, Path(tmp) / f"{i:05d}.dcm") for i, case in enumerate(cases)]
        uids = [uid for uid, _ in written]
        paths = [Path(tmp) / f"{i:05d}.dcm" for i in range(len(cases))]
        ingest_written(settings, session_factory, store, paths, uids, report, str(folder))
    labelled = [(uid, truth) for uid, truth in written if truth is not None and not unlabeled]
    report.study_uids = uids
    return _finish(session_factory, store, task, folder, which, report, labelled, actor)


def _finish(
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    task: Task,
    folder: Path,
    which: str,
    report: ImportReport,
    labelled: list[tuple[str, GroundTruth]],
    actor: str,
) -> ImportReport:
    """Store the masks, add their labels, audit the import."""
    if labelled:
        values = [save_mask(store, uid, task.name, truth) for uid, truth in labelled]
        split = "train" if which == "training" else which
        report.labels = add_import_labels(
            session_factory, task, [uid for uid, _ in labelled], values, split, actor
        )
    report.studies, report.by_split = len(report.study_uids), {which: len(report.study_uids)}
    with unit_of_work(session_factory) as session:
        session.add(
            record(actor, "import", "dataset", report.dataset, task=task.name, labels=report.labels)
        )
    logger.info("imported %s: %s", report.dataset, report.summary())
    return report


def _series_files(image: Path) -> list[Path]:
    """A volume case's DICOM files: the folder's files (any depth), or the one file."""
    if image.is_file():
        return [image]
    files = sorted(p for p in image.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{image} holds no files; give the folder of the case's series")
    return files


def _import_volumes(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    cases: list[Case],
    folder: Path,
    report: ImportReport,
) -> None:
    """Ingest each case's series as received files (validated like any other)."""
    files = [_series_files(case.image) for case in cases]
    uids = [
        str(pydicom.dcmread(found[0], stop_before_pixels=True).StudyInstanceUID) for found in files
    ]
    paths = [path for found in files for path in found]
    ingest_written(
        settings, session_factory, store, paths, uids, report, str(folder), immutable=False
    )
    report.study_uids = uids


def _volume_masks(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    task: Task,
    cases: list[Case],
    report: ImportReport,
    unlabeled: bool,
) -> list[tuple[str, GroundTruth]]:
    """Each labelled case's mask, read against its series as the task assembles it."""
    if unlabeled:
        return []
    wanted = [(uid, case) for uid, case in zip(report.study_uids, cases, strict=True) if case.label]
    with session_factory() as session:
        rows = session.execute(
            select(Study.study_uid, Study.id).where(Study.study_uid.in_([u for u, _ in wanted]))
        )
        ids = {uid: study_id for uid, study_id in rows}
        routes = route_studies(
            session,
            list(ids.values()),
            task,
            rules_for(settings),
            max_voxels=settings.max_volume_voxels,
        )
    labelled = []
    for uid, case in wanted:
        assert case.label is not None
        routed = routes[ids[uid]]
        if routed.plan is None:
            raise ValueError(
                f"{case.image} gives no volume for {task.name} ({routed.reason}); give the "
                "whole series"
            )
        sources = load_sources(store, [s.object_key for s in routed.plan.slices])
        shape = (routed.plan.depth, int(sources[0].Rows), int(sources[0].Columns))
        mask = read_mask(
            case.label.name,
            case.label.read_bytes(),
            shape,
            sources=sources,
            affine=routed.plan.affine(),
        )
        labelled.append((uid, GroundTruth(mask)))
    return labelled
