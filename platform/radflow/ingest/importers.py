"""Importing labelled datasets through the front door: npz arrays -> DICOM studies -> ingest.

A MedMNIST-format npz (``<split>_images`` / ``<split>_labels`` arrays) becomes one DX study per
image, or, for a task on volumes (MedMNIST 3D: (N, D, H, W) arrays), one CT study per volume,
written as real DICOM and ingested by the same code a modality's C-STORE goes through, so
imported studies are indistinguishable from received ones. Labels are recorded with source
``import`` and the split name kept, which is what training uses to honour the dataset's own
train/validation split.

Images smaller than ``MIN_SIZE`` (PneumoniaMNIST: 28x28) are upsampled (bicubic) to 64 px on
their short side: routing rightly refuses images under 32 px (no radiograph is that small; such
files are thumbnails or localizers), and 64 px keeps every source pixel's information (an
integer-free 2.3x interpolation, no detail invented beyond smoothing). The task's own
preprocessing then resizes, the same way for imported and received studies.

A volume becomes a series of single-frame CT Image instances (radflow.dicom.writer.CTSeriesBuilder)
with real geometry: axial slices, :data:`VOLUME_SPACING_MM` apart, the first array axis running
from inferior to superior. Its 8-bit values are mapped linearly onto the abdominal soft-tissue
window (radflow.dicom.writer.ABDOMEN_WINDOW, 400 HU over 256 values, so every source value keeps
a Hounsfield unit of its own), which a volume task's windowing undoes.

Everything is deterministic in the file's content: importing the same file again stores nothing
twice and adds no label twice.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import UID, generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from radflow import ingest
from radflow.db import Label, Study, unit_of_work
from radflow.db.audit import record
from radflow.dicom.instance import read_header
from radflow.dicom.writer import (
    ABDOMEN_WINDOW,
    CTSeriesBuilder,
    cxr_dataset,
    display_window,
    window_range,
)
from radflow.learning.tasks import Task, get_task
from radflow.settings import Settings
from radflow.store import ObjectStore

logger = logging.getLogger(__name__)

IMPORT_SOURCE = "import"
IMPORT_INSTITUTION = "Radflow dataset import"
IMPORT_DATETIME = dt.datetime(2020, 1, 1, 0, 0, 0)
# Files are written and ingested in chunks: bounded temporary disk, and progress in the log.
_CHUNK = 1000


@dataclass
class ImportReport:
    dataset: str
    studies: int = 0
    stored: int = 0
    duplicates: int = 0
    labels: int = 0
    by_split: dict[str, int] = field(default_factory=dict)
    study_uids: list[str] = field(default_factory=list)

    def summary(self) -> str:
        splits = ", ".join(f"{k}: {v}" for k, v in self.by_split.items())
        return (
            f"{self.studies} studies ({splits}); stored {self.stored}, already there "
            f"{self.duplicates}; {self.labels} new labels"
        )


@dataclass(frozen=True)
class NpzSplit:
    name: str
    images: np.ndarray  # (N, H, W) uint8 or uint16 images, or (N, D, H, W) uint8 volumes
    labels: np.ndarray | None  # (N,) class indices


def read_npz(
    path: Path, splits: Sequence[str] | None = None, *, volumes: bool = False
) -> tuple[str, list[NpzSplit]]:
    """The file's content digest and the requested splits (default: every split it has):
    (N, H, W) images, or with ``volumes`` (N, D, H, W) volumes."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; give the path of a MedMNIST .npz file")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with np.load(path) as data:
        available = sorted(k.removesuffix("_images") for k in data.files if k.endswith("_images"))
        wanted = list(splits) if splits else available
        missing = [s for s in wanted if s not in available]
        if missing:
            raise ValueError(
                f"{path.name} has no split(s) {missing}; it has {available or 'none'} "
                "(MedMNIST layout: <split>_images and <split>_labels arrays)"
            )
        out = []
        for name in wanted:
            images = np.asarray(data[f"{name}_images"])
            _check_shape(name, images, volumes)
            labels = data.get(f"{name}_labels")
            out.append(NpzSplit(name, images, None if labels is None else _class_indices(labels)))
    return digest, out


def _check_shape(name: str, images: np.ndarray, volumes: bool) -> None:
    if volumes and (images.ndim != 4 or images.dtype != np.uint8):
        raise ValueError(
            f"{name}_images must be (N, D, H, W) uint8 volumes for a task on volumes (MedMNIST "
            f"3D layout), got {images.dtype} of shape {images.shape}; import 2D images with a "
            "2D task"
        )
    if not volumes and images.ndim != 3:
        raise ValueError(
            f"{name}_images must be (N, H, W) grey-scale images, got shape {images.shape}"
            + ("; import volumes with a task on volumes" if images.ndim == 4 else "")
        )


def _class_indices(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"labels must be one class index per image, got shape {labels.shape}")
    return arr.astype(np.int64)


MIN_SIZE = 64


def _to_12_bit(image: np.ndarray) -> np.ndarray:
    """Source pixels as the 12-bit DX pixels the header declares, at least MIN_SIZE px."""
    values = image.astype(np.float32) * (16.0 if image.dtype == np.uint8 else 1.0)
    rows, cols = image.shape
    if min(rows, cols) < MIN_SIZE:
        scale = MIN_SIZE / min(rows, cols)
        size = (round(cols * scale), round(rows * scale))
        values = np.asarray(
            Image.fromarray(values, mode="F").resize(size, Image.Resampling.BICUBIC)
        )
    return np.clip(np.round(values), 0, 4095).astype(np.uint16)


@dataclass(frozen=True)
class _Identity:
    """Deterministic UIDs and a pseudonymous patient per imported item: MedMNIST carries no
    patient identity, so each image (or volume) is its own patient."""

    digest: str
    split: str

    def uid(self, index: int, kind: str) -> UID:
        return generate_uid(
            entropy_srcs=["radflow-import", self.digest, self.split, str(index), kind]
        )

    def patient(self, index: int) -> str:
        text = f"{self.digest}:{self.split}:{index}"
        return hashlib.sha256(text.encode()).hexdigest()[:12].upper()


def _accession(patient: str) -> str:
    return f"IMP{int(patient[:8], 16) % 10**12:012d}"


class _Writer(Protocol):
    def write(self, index: int, image: np.ndarray, folder: Path) -> tuple[str, list[Path]]:
        """Write item ``index`` as DICOM files in ``folder``: its study UID and the files."""
        ...


class _StudyWriter:
    """Writes one DX file per image from a header template.

    Building a complete DX dataset costs ~100 pydicom element assignments; only a dozen differ
    between imported images, so the template is built once and those are replaced per image.
    """

    def __init__(self, identity: _Identity, image: np.ndarray) -> None:
        self.identity = identity
        self.template = cxr_dataset(
            _to_12_bit(image),
            patient_id="IMP-TEMPLATE",
            patient_name="IMPORT^TEMPLATE",
            study_datetime=IMPORT_DATETIME,
            institution=IMPORT_INSTITUTION,
            model_name=IMPORT_INSTITUTION,
        )

    def write(self, index: int, image: np.ndarray, folder: Path) -> tuple[str, list[Path]]:
        patient = self.identity.patient(index)
        pixels = _to_12_bit(image)
        ds = self.template
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = self.identity.uid(
            index, "sop"
        )
        ds.StudyInstanceUID = self.identity.uid(index, "study")
        ds.SeriesInstanceUID = self.identity.uid(index, "series")
        ds.PatientID = f"IMP-{patient}"
        ds.PatientName = f"IMPORT^{patient}"
        ds.AccessionNumber = _accession(patient)
        ds.StudyID = str(index + 1)
        ds.Rows, ds.Columns = pixels.shape
        low, high = display_window(pixels)
        ds.WindowCenter = f"{(low + high) / 2:.1f}"
        ds.WindowWidth = f"{max(high - low, 1.0):.1f}"
        ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
        path = folder / f"{index:06d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        return str(ds.StudyInstanceUID), [path]


VOLUME_SPACING_MM = 1.0
"""Voxel size given to imported volumes (MedMNIST 3D resamples its sources to a cube and keeps
no spacing): isotropic, so the volume keeps its proportions."""


class _VolumeWriter:
    """Writes each (D, H, W) uint8 volume as one CT study: D axial slices, one file each."""

    def __init__(self, identity: _Identity) -> None:
        self.identity = identity

    def write(self, index: int, volume: np.ndarray, folder: Path) -> tuple[str, list[Path]]:
        patient = self.identity.patient(index)
        study_uid = str(self.identity.uid(index, "study"))
        builder = CTSeriesBuilder(
            rows=volume.shape[1],
            columns=volume.shape[2],
            spacing=(VOLUME_SPACING_MM,) * 3,
            patient_id=f"IMP-{patient}",
            patient_name=f"IMPORT^{patient}",
            study_uid=study_uid,
            series_uid=str(self.identity.uid(index, "series")),
            study_datetime=IMPORT_DATETIME,
            accession=_accession(patient),
            study_id=str(index + 1),
            window=ABDOMEN_WINDOW,
            institution=IMPORT_INSTITUTION,
            model_name=IMPORT_INSTITUTION,
        )
        paths = []
        for number, hu in enumerate(_abdominal_hu(volume)):
            path = folder / f"{index:06d}-{number:04d}.dcm"
            ds = builder.slice(
                number, hu, sop_instance_uid=self.identity.uid(index, f"sop{number}")
            )
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
            paths.append(path)
        return study_uid, paths


def _abdominal_hu(volume: np.ndarray) -> np.ndarray:
    """8-bit values spread linearly over the abdominal window, in whole Hounsfield units (400 HU
    over 256 values: no two source values share one)."""
    low, high = window_range(ABDOMEN_WINDOW)
    hu: np.ndarray = np.rint(low + volume.astype(np.float32) * ((high - low) / 255.0))
    return hu


def import_npz(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    path: Path,
    task_name: str,
    *,
    splits: Sequence[str] | None = None,
    unlabeled: bool = False,
    actor: str = "radflow",
) -> ImportReport:
    """Import ``splits`` of the npz at ``path`` as studies for ``task_name``, with labels."""
    task = get_task(task_name)
    digest, parts = read_npz(path, splits, volumes=task.takes_series)
    report = ImportReport(dataset=f"{path.name}@{digest[:12]}")
    for part in parts:
        if not unlabeled and part.labels is None:
            raise ValueError(
                f"split {part.name!r} of {path.name} has no labels; import it with --unlabeled"
            )
        # About _CHUNK files per chunk: a volume is a file per slice.
        chunk = max(1, _CHUNK // (part.images.shape[1] if task.takes_series else 1))
        for start in range(0, len(part.images), chunk):
            stop = min(start + chunk, len(part.images))
            identity = _Identity(digest, part.name)
            writer: _Writer = (
                _VolumeWriter(identity)
                if task.takes_series
                else _StudyWriter(identity, part.images[start])
            )
            uids = _ingest_chunk(
                settings, session_factory, store, writer, part, start, stop, report
            )
            if not unlabeled and part.labels is not None:
                values = [_label_value(task, int(c)) for c in part.labels[start:stop]]
                report.labels += add_import_labels(
                    session_factory, task, uids, values, part.name, actor
                )
            report.study_uids += uids
            logger.info("imported %s %d/%d", part.name, stop, len(part.images))
        report.by_split[part.name] = len(part.images)
        report.studies += len(part.images)
    with unit_of_work(session_factory) as session:
        session.add(
            record(
                actor,
                "import",
                "dataset",
                report.dataset,
                task=task.name,
                splits=report.by_split,
                labels=report.labels,
            )
        )
    return report


def _label_value(task: Task, class_index: int) -> str:
    if not 0 <= class_index < len(task.labels):
        raise ValueError(
            f"class index {class_index} has no label in task {task.name} (labels {task.labels})"
        )
    return task.labels[class_index]


def _ingest_chunk(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    writer: _Writer,
    part: NpzSplit,
    start: int,
    stop: int,
    report: ImportReport,
) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="radflow-import-") as tmp:
        paths: list[Path] = []
        uids = []
        for index in range(start, stop):
            uid, files = writer.write(index, part.images[index], Path(tmp))
            uids.append(uid)
            paths += files
        ingest_written(
            settings,
            session_factory,
            store,
            paths,
            uids,
            report,
            f"{part.name} {start}..{stop - 1}",
        )
    return uids


def ingest_written(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    paths: Sequence[Path],
    study_uids: Sequence[str],
    report: ImportReport,
    what: str,
    *,
    immutable: bool = True,
) -> None:
    """Ingest files an importer wrote, then mark their studies stable (a set is complete).

    Validated like any received file, then indexed with one commit (the receiver's batch
    path): a commit per image would dominate the import time. ``immutable``: False for files
    the importer did not write (a dataset's own DICOM series), which the store then copies.
    """
    headers = [(p, read_header(p, settings.max_pixels)) for p in paths]
    ingested = ingest.ingest_batch(
        headers,
        settings=settings,
        session_factory=session_factory,
        store=store,
        immutable=immutable,  # written by the importer, only deleted afterwards
    )
    if ingested.rejected:
        # Another encoding of an image imported before is a duplicate (a newer pydicom writes
        # other file meta): only other pixels under the same UIDs get here.
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(ingested.reasons.items()))
        first = next(iter(ingested.rejected.values()))
        raise ValueError(
            f"ingest refused {len(ingested.rejected)} of the images imported from {what} "
            f"({reasons}); the first: {first}"
        )
    report.stored += ingested.stored
    report.duplicates += ingested.duplicates
    with unit_of_work(session_factory) as session:
        ingest.mark_stable(session, list(study_uids))


def add_import_labels(
    session_factory: sessionmaker[Session],
    task: Task,
    study_uids: Sequence[str],
    values: Sequence[str],
    split: str,
    actor: str,
) -> int:
    """One import label per study (none added twice); one audit event covers the dataset."""
    with unit_of_work(session_factory) as session:
        rows = session.execute(
            select(Study.study_uid, Study.id).where(Study.study_uid.in_(list(study_uids)))
        )
        ids = {uid: study_id for uid, study_id in rows}
        labelled = set(
            session.scalars(
                select(Label.study_id).where(
                    Label.study_id.in_(list(ids.values())),
                    Label.task == task.name,
                    Label.source == IMPORT_SOURCE,
                )
            )
        )
        added = 0
        for uid, value in zip(study_uids, values, strict=True):
            if ids[uid] in labelled:
                continue
            session.add(
                Label(
                    study_id=ids[uid],
                    task=task.name,
                    value=value,
                    source=IMPORT_SOURCE,
                    author=actor,
                    split=split,
                )
            )
            added += 1
    return added
