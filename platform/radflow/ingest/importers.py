"""Importing labelled datasets through the front door: npz arrays -> DICOM studies -> ingest.

A MedMNIST-format npz (``<split>_images`` / ``<split>_labels`` arrays) becomes one DX study per
image, written as real DICOM and ingested by the same code a modality's C-STORE goes through, so
imported studies are indistinguishable from received ones. Labels are recorded with source
``import`` and the split name kept, which is what training uses to honour the dataset's own
train/validation split.

Images smaller than ``MIN_SIZE`` (PneumoniaMNIST: 28x28) are upsampled (bicubic) to 64 px on
their short side: routing rightly refuses images under 32 px (no radiograph is that small; such
files are thumbnails or localizers), and 64 px keeps every source pixel's information (an
integer-free 2.3x interpolation, no detail invented beyond smoothing). The task's own
preprocessing then resizes, the same way for imported and received studies.

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
from radflow.dicom.writer import cxr_dataset, display_window
from radflow.learning.tasks import Task, get_task
from radflow.settings import Settings
from radflow.store import ObjectStore

logger = logging.getLogger(__name__)

IMPORT_SOURCE = "import"
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
    images: np.ndarray  # (N, H, W) uint8 or uint16
    labels: np.ndarray | None  # (N,) class indices


def read_npz(path: Path, splits: Sequence[str] | None = None) -> tuple[str, list[NpzSplit]]:
    """The file's content digest and the requested splits (default: every split it has)."""
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
            if images.ndim != 3:
                raise ValueError(
                    f"{name}_images must be (N, H, W) grey-scale images, got shape {images.shape}"
                )
            labels = data.get(f"{name}_labels")
            out.append(NpzSplit(name, images, None if labels is None else _class_indices(labels)))
    return digest, out


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


class _StudyWriter:
    """Writes one DX file per image from a header template.

    Building a complete DX dataset costs ~100 pydicom element assignments; only a dozen differ
    between imported images, so the template is built once and those are replaced per image.
    """

    def __init__(self, digest: str, split: str, image: np.ndarray) -> None:
        self.digest, self.split = digest, split
        self.template = cxr_dataset(
            _to_12_bit(image),
            patient_id="IMP-TEMPLATE",
            patient_name="IMPORT^TEMPLATE",
            study_datetime=dt.datetime(2020, 1, 1, 0, 0, 0),
            institution="Radflow dataset import",
            model_name="Radflow dataset import",
        )

    def write(self, index: int, image: np.ndarray, path: Path) -> str:
        def uid(kind: str) -> UID:
            parts = ["radflow-import", self.digest, self.split, str(index), kind]
            return generate_uid(entropy_srcs=parts)

        # MedMNIST carries no patient identity: each image is its own pseudonymous patient.
        patient = hashlib.sha256(f"{self.digest}:{self.split}:{index}".encode()).hexdigest()
        patient = patient[:12].upper()
        pixels = _to_12_bit(image)
        ds = self.template
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid("sop")
        ds.StudyInstanceUID = uid("study")
        ds.SeriesInstanceUID = uid("series")
        ds.PatientID = f"IMP-{patient}"
        ds.PatientName = f"IMPORT^{patient}"
        ds.AccessionNumber = f"IMP{int(patient[:8], 16) % 10**12:012d}"
        ds.StudyID = str(index + 1)
        ds.Rows, ds.Columns = pixels.shape
        low, high = display_window(pixels)
        ds.WindowCenter = f"{(low + high) / 2:.1f}"
        ds.WindowWidth = f"{max(high - low, 1.0):.1f}"
        ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        return str(ds.StudyInstanceUID)


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
    digest, parts = read_npz(path, splits)
    report = ImportReport(dataset=f"{path.name}@{digest[:12]}")
    for part in parts:
        if not unlabeled and part.labels is None:
            raise ValueError(
                f"split {part.name!r} of {path.name} has no labels; import it with --unlabeled"
            )
        for start in range(0, len(part.images), _CHUNK):
            stop = min(start + _CHUNK, len(part.images))
            uids = _ingest_chunk(
                settings, session_factory, store, digest, part, start, stop, report
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
    digest: str,
    part: NpzSplit,
    start: int,
    stop: int,
    report: ImportReport,
) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="radflow-import-") as tmp:
        paths, uids = [], []
        writer = _StudyWriter(digest, part.name, part.images[start])
        for index in range(start, stop):
            file = Path(tmp) / f"{index:06d}.dcm"
            uids.append(writer.write(index, part.images[index], file))
            paths.append(file)
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
) -> None:
    """Ingest files an importer wrote, then mark their studies stable (a set is complete).

    Validated like any received file, then indexed with one commit (the receiver's batch
    path): a commit per image would dominate the import time.
    """
    headers = [(p, read_header(p, settings.max_pixels)) for p in paths]
    ingested = ingest.ingest_batch(
        headers,
        settings=settings,
        session_factory=session_factory,
        store=store,
        immutable=True,  # written by the importer, only deleted afterwards
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
