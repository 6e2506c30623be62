"""Importing a 2D segmentation dataset in the Medical Segmentation Decathlon layout.

A folder with a ``dataset.json`` whose ``training`` (or ``test``) list names, per case, an
``image`` (a colour photograph: TIFF, PNG, JPEG...), a ``label`` mask and optionally a ``fov``
mask (the field of view: the pixels evaluation counts, as DRIVE gives): pictures or NIfTI,
read by radflow.learning.mask_files. Each image becomes a VL
Photographic Image study (RGB, modality XC; radflow.dicom.writer.photograph_dataset), written
as real DICOM and ingested through the front door; its mask is stored (radflow.learning.masks)
and recorded as an import label, with the list name as its split ("training" as "train").
Everything is deterministic in the files' content: importing again stores nothing twice and
adds no label twice.
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
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import unit_of_work
from radflow.db.audit import record
from radflow.dicom.writer import photograph_dataset
from radflow.ingest.importers import ImportReport, add_import_labels, ingest_written
from radflow.learning.mask_files import read_mask
from radflow.learning.masks import GroundTruth, save_mask
from radflow.learning.tasks import get_task
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
            if not path.is_file():
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
    if task.kind != "segmentation":
        raise ValueError(f"{task.name} is a {task.kind} task; import masks for a segmentation task")
    cases = read_dataset(folder, which)
    report = ImportReport(dataset=f"{folder.name}:{which}")
    with tempfile.TemporaryDirectory(prefix="radflow-import-") as tmp:
        written = [_write(case, Path(tmp) / f"{i:05d}.dcm") for i, case in enumerate(cases)]
        uids = [uid for uid, _ in written]
        paths = [Path(tmp) / f"{i:05d}.dcm" for i in range(len(cases))]
        ingest_written(settings, session_factory, store, paths, uids, report, str(folder))
    labelled = [(uid, truth) for uid, truth in written if truth is not None and not unlabeled]
    if labelled:
        values = [save_mask(store, uid, task.name, truth) for uid, truth in labelled]
        split = "train" if which == "training" else which
        report.labels = add_import_labels(
            session_factory, task, [uid for uid, _ in labelled], values, split, actor
        )
    report.studies, report.by_split, report.study_uids = len(cases), {which: len(cases)}, uids
    with unit_of_work(session_factory) as session:
        session.add(
            record(actor, "import", "dataset", report.dataset, task=task.name, labels=report.labels)
        )
    logger.info("imported %s: %s", report.dataset, report.summary())
    return report
