"""Ingest: validated DICOM files into the object store (originals) and the database (index).

The object is written before the index row, and the key is a function of the UIDs, so a crash
between the two leaves nothing an ingest re-run does not repair. The same instance twice is
stored once.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import (
    Instance,
    Patient,
    Rejection,
    Series,
    Study,
    StudyStatus,
    unit_of_work,
)
from radflow.db.base import utcnow
from radflow.dicom.instance import InstanceHeader, read_header
from radflow.errors import ConflictingInstance, InvalidInstance
from radflow.pseudonym import pseudonymise
from radflow.settings import Settings
from radflow.stability import promote
from radflow.store import ObjectStore, keys

logger = logging.getLogger(__name__)


@dataclass
class IngestReport:
    stored: int = 0
    duplicates: int = 0
    rejected: dict[str, str] = field(default_factory=dict)
    reasons: Counter[str] = field(default_factory=Counter)
    study_uids: set[str] = field(default_factory=set)

    def count(self, study_uid: str, is_new: bool) -> None:
        """Account for one accepted file: newly stored, or a duplicate of a stored instance."""
        self.study_uids.add(study_uid)
        if is_new:
            self.stored += 1
        else:
            self.duplicates += 1

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
    for path in paths:
        try:
            header, is_new = ingest_file(
                path, settings=settings, session_factory=session_factory, store=store
            )
        except InvalidInstance as exc:
            report.rejected[str(path)] = f"{exc.reason}: {exc}"
            report.reasons[exc.reason] += 1
            logger.warning("rejected %s: %s", path.name, exc.reason)
            with unit_of_work(session_factory) as session:
                session.add(rejection("ingest", exc, origin=path.name))
            continue
        report.count(header.study_uid, is_new)
    return report


def ingest_file(
    path: Path,
    *,
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
) -> tuple[InstanceHeader, bool]:
    """Validate, store and index one file in its own transaction; True when it was new.

    Raises InvalidInstance (with its reason code) for a file Radflow refuses.
    """
    header = read_header(path, settings.max_pixels)
    with unit_of_work(session_factory) as session:
        is_new = ingest_instance(
            session, store, header, path, settings.pseudonym_key.get_secret_value()
        )
    return header, is_new


def ingest_batch(
    items: Sequence[tuple[Path, InstanceHeader]],
    *,
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
) -> IngestReport:
    """Store and index already validated instances with one commit for the whole batch.

    For the receiver's spool: one transaction per batch instead of one per file. If the batch
    meets a refused instance (``uid-conflict``) or a concurrent writer of the same rows, it is
    rolled back and every file is retried in its own transaction, so one bad instance never holds
    back the others. Outages (database, object store) propagate: the caller keeps the files.
    ``report.rejected`` is keyed by path.
    """
    key = settings.pseudonym_key.get_secret_value()
    report = IngestReport()
    try:
        with unit_of_work(session_factory) as session:
            new = [ingest_instance(session, store, header, path, key) for path, header in items]
    except (InvalidInstance, IntegrityError):
        logger.info("batch of %d refused as a whole; indexing its files one by one", len(items))
        new = []
        for path, header in items:
            try:
                with unit_of_work(session_factory) as session:
                    new.append(ingest_instance(session, store, header, path, key))
            except InvalidInstance as exc:
                report.rejected[str(path)] = f"{exc.reason}: {exc}"
                report.reasons[exc.reason] += 1
                continue
            report.study_uids.add(header.study_uid)
        report.stored, report.duplicates = sum(new), len(new) - sum(new)
        return report
    report.stored, report.duplicates = sum(new), len(new) - sum(new)
    report.study_uids.update(header.study_uid for _, header in items)
    return report


def rejection(
    source: str, exc: InvalidInstance, *, origin: str | None, quarantine_key: str | None = None
) -> Rejection:
    """The row that makes a refused input visible (``radflow status``); never silent."""
    return Rejection(
        source=source,
        reason=exc.reason,
        message=str(exc)[:1024],
        origin=origin[:255] if origin else None,
        quarantine_key=quarantine_key,
    )


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
        image_type=header.image_type,
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
    uids = list(study_uids)
    complete = Study.study_uid.in_(uids) & (Study.status == StudyStatus.RECEIVING)
    return len(promote(session, complete, utcnow())) if uids else 0
