"""Ingest: validated DICOM files into the object store (originals) and the database (index).

The object is written before the index row, and the key is a function of the UIDs, so a crash
between the two leaves nothing an ingest re-run does not repair. The same instance twice is
stored once.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import Instance, Patient, Series, Study, StudyStatus, unit_of_work
from radflow.db.base import utcnow
from radflow.dicom.instance import InstanceHeader, read_header
from radflow.errors import ConflictingInstance, InvalidInstance
from radflow.pseudonym import pseudonymise
from radflow.settings import Settings
from radflow.store import ObjectStore, keys

logger = logging.getLogger(__name__)


@dataclass
class IngestReport:
    stored: int = 0
    duplicates: int = 0
    rejected: dict[str, str] = field(default_factory=dict)
    reasons: Counter[str] = field(default_factory=Counter)
    study_uids: set[str] = field(default_factory=set)

    def summary(self) -> str:
        text = f"stored {self.stored}, duplicates {self.duplicates}, rejected {len(self.rejected)}"
        if self.reasons:
            text += " (" + ", ".join(f"{r}: {n}" for r, n in sorted(self.reasons.items())) + ")"
        return text


def find_files(folder: Path) -> Iterator[Path]:
    """Every regular file under ``folder``, in a stable order, skipping hidden files."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a folder; give the folder that holds the DICOM files"
        )
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not any(
            part.startswith(".") for part in path.relative_to(folder).parts
        ):
            yield path


def ingest_files(
    paths: Iterable[Path],
    *,
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
) -> IngestReport:
    """Ingest each file; a bad file is reported with its reason and never stops the others."""
    report = IngestReport()
    key = settings.pseudonym_key.get_secret_value()
    for path in paths:
        try:
            header = read_header(path, settings.max_pixels)
            with unit_of_work(session_factory) as session:
                is_new = ingest_instance(session, store, header, path, key)
        except InvalidInstance as exc:
            report.rejected[str(path)] = f"{exc.reason}: {exc}"
            report.reasons[exc.reason] += 1
            logger.warning("rejected %s: %s", path.name, exc.reason)
            continue
        report.study_uids.add(header.study_uid)
        if is_new:
            report.stored += 1
        else:
            report.duplicates += 1
    return report


def ingest_instance(
    session: Session, store: ObjectStore, header: InstanceHeader, path: Path, pseudonym_key: str
) -> bool:
    """Store and index one instance; False when it was already there (same UID, same bytes)."""
    existing = session.scalar(
        select(Instance).where(Instance.sop_instance_uid == header.sop_instance_uid)
    )
    if existing is not None:
        if existing.sha256 != header.sha256:
            raise ConflictingInstance(header.sop_instance_uid)
        return False
    object_key = keys.original(header.study_uid, header.series_uid, header.sop_instance_uid)
    store.put_file(object_key, path, content_type="application/dicom")
    series = _series(session, header, pseudonym_key)
    session.add(
        Instance(
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            series=series,
            number=header.instance_number,
            object_key=object_key,
            size_bytes=header.size_bytes,
            sha256=header.sha256,
            transfer_syntax_uid=header.transfer_syntax_uid,
            rows=header.rows,
            columns=header.columns,
            frames=header.frames,
        )
    )
    study = series.study
    study.last_instance_at = utcnow()
    if study.status not in (StudyStatus.RECEIVING,):
        # A late instance reopens a study that was already complete: it is processed again whole.
        study.status = StudyStatus.RECEIVING
        study.status_reason = "new instance arrived"
    return True


def _series(session: Session, header: InstanceHeader, pseudonym_key: str) -> Series:
    series = session.scalar(select(Series).where(Series.series_uid == header.series_uid))
    if series is not None:
        return series
    series = Series(
        series_uid=header.series_uid,
        study=_study(session, header, pseudonym_key),
        modality=header.modality,
        number=header.series_number,
        description=header.series_description,
        body_part=header.body_part,
    )
    session.add(series)
    return series


def _study(session: Session, header: InstanceHeader, pseudonym_key: str) -> Study:
    study = session.scalar(select(Study).where(Study.study_uid == header.study_uid))
    if study is not None:
        return study
    study = Study(
        study_uid=header.study_uid,
        patient=_patient(session, header.patient_id, pseudonym_key),
        accession_number=header.accession_number,
        study_date=header.study_date,
        description=header.study_description,
        modality=header.modality,
        status=StudyStatus.RECEIVING,
    )
    session.add(study)
    return study


def _patient(session: Session, patient_id: str, pseudonym_key: str) -> Patient:
    pseudonym = pseudonymise(patient_id or "(no patient id)", pseudonym_key)
    patient = session.scalar(select(Patient).where(Patient.pseudonym == pseudonym))
    if patient is None:
        patient = Patient(pseudonym=pseudonym)
        session.add(patient)
    return patient


def mark_stable(session: Session, study_uids: Iterable[str]) -> int:
    """Studies whose instances have all arrived become ready for processing."""
    studies = session.scalars(
        select(Study).where(
            Study.study_uid.in_(list(study_uids)), Study.status == StudyStatus.RECEIVING
        )
    ).all()
    for study in studies:
        study.status = StudyStatus.STABLE
        study.status_reason = None
        study.stable_at = utcnow()
    return len(studies)
