"""Ingest: validated DICOM files into the object store (originals) and the database (index).

The object is written before the index row, and the key is a function of the UIDs and the
content's digest (radflow/store/keys.py), so a crash between the two leaves nothing an ingest
re-run does not repair, and a refused file never overwrites an indexed one. The same instance
twice is stored once.
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
from radflow.dicom.pseudonym import pseudonymise
from radflow.errors import ConflictingInstance, InvalidInstance
from radflow.ingest.stability import promote
from radflow.settings import Settings
from radflow.store import ObjectStore, keys

logger = logging.getLogger(__name__)

# SOP Instance UIDs per lookup query: well under every backend's bound-parameter limit.
_UID_CHUNK = 500


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
    key = settings.pseudonym_key.get_secret_value()
    return header, _index_alone((path, header), key, session_factory, store)


def _index_alone(
    item: tuple[Path, InstanceHeader],
    pseudonym_key: str,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    *,
    immutable: bool = False,
) -> bool:
    """Index one file in its own transaction; True when it was new, InvalidInstance if refused.

    A concurrent writer may commit the same instance, study, series or patient row between
    this transaction's lookups and its insert: the IntegrityError that follows is answered by
    one more attempt, which sees that row. If the concurrent row was the same UID with other
    bytes, this file's object, written under its own digest's key, is deleted again.
    """

    def attempt() -> bool:
        with unit_of_work(session_factory) as session:
            (is_new,) = index_instances(session, store, [item], pseudonym_key, immutable=immutable)
        return is_new

    try:
        try:
            return attempt()
        except IntegrityError:
            logger.info("a concurrent writer indexed rows of this instance first; looking again")
            return attempt()
    except ConflictingInstance:
        # Written by an earlier attempt (this one's or its batch's) and referenced by no row:
        # the row with this UID holds other bytes, hence another key.
        store.delete(_object_key(item[1]))
        raise


def ingest_batch(
    items: Sequence[tuple[Path, InstanceHeader]],
    *,
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    immutable: bool = False,
) -> IngestReport:
    """Store and index already validated instances with one commit for the whole batch.

    For the receiver's spool and the importer: one transaction per batch instead of one per
    file. If the batch meets a refused instance (``uid-conflict``) or a concurrent writer of the
    same rows, it is rolled back and every file is retried in its own transaction, so one bad
    instance never holds back the others. Outages (database, object store) propagate: the
    caller keeps the files. ``report.rejected`` is keyed by path. ``immutable``: the caller
    never changes the files (see :meth:`radflow.store.ObjectStore.put_files`).
    """
    key = settings.pseudonym_key.get_secret_value()
    report = IngestReport()
    try:
        with unit_of_work(session_factory) as session:
            new = index_instances(session, store, items, key, immutable=immutable)
    except (InvalidInstance, IntegrityError):
        logger.info("batch of %d refused as a whole; indexing its files one by one", len(items))
        new = []
        for item in items:
            try:
                new.append(_index_alone(item, key, session_factory, store, immutable=immutable))
            except InvalidInstance as exc:
                report.rejected[str(item[0])] = f"{exc.reason}: {exc}"
                report.reasons[exc.reason] += 1
                continue
            report.study_uids.add(item[1].study_uid)
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


def index_instances(
    session: Session,
    store: ObjectStore,
    items: Sequence[tuple[Path, InstanceHeader]],
    pseudonym_key: str,
    *,
    immutable: bool = False,
) -> list[bool]:
    """Store and index instances; per item, False when it was already there (same UID, bytes).

    Set-wise, so a batch costs a few queries and one store write, not several per instance:
    one lookup of the UIDs already indexed, one per new series, one ``put_files``. Raises
    ConflictingInstance for a UID already indexed (or twice in ``items``) with other bytes.
    """
    known = _indexed_digests(session, [header.sop_instance_uid for _, header in items])
    is_new: list[bool] = []
    fresh: list[tuple[Path, InstanceHeader]] = []
    for path, header in items:
        digest = known.get(header.sop_instance_uid)
        if digest is None:  # new (a second copy further on in ``items`` is a duplicate)
            known[header.sop_instance_uid] = header.sha256
            fresh.append((path, header))
        elif digest != header.sha256:
            raise ConflictingInstance(header.sop_instance_uid)
        is_new.append(digest is None)
    store.put_files(
        [(_object_key(header), path) for path, header in fresh],
        "application/dicom",
        immutable=immutable,
    )
    series: dict[str, Series] = {}
    for _, header in fresh:
        if header.series_uid not in series:
            series[header.series_uid] = _series(session, header, pseudonym_key)
        session.add(_instance_row(header, series[header.series_uid]))
    for study in {id(s.study): s.study for s in series.values()}.values():
        _touch(study)
    return is_new


def _indexed_digests(session: Session, sop_instance_uids: Sequence[str]) -> dict[str, str]:
    """SOP Instance UID -> SHA-256 of those already indexed (in chunks: bound parameters)."""
    digests: dict[str, str] = {}
    unique = sorted(set(sop_instance_uids))
    for start in range(0, len(unique), _UID_CHUNK):
        chunk = unique[start : start + _UID_CHUNK]
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.sha256).where(
                Instance.sop_instance_uid.in_(chunk)
            )
        )
        digests.update((uid, sha) for uid, sha in rows)
    return digests


def _object_key(header: InstanceHeader) -> str:
    return keys.original(
        header.study_uid, header.series_uid, header.sop_instance_uid, header.sha256
    )


def _instance_row(header: InstanceHeader, series: Series) -> Instance:
    return Instance(
        sop_instance_uid=header.sop_instance_uid,
        sop_class_uid=header.sop_class_uid,
        series=series,
        number=header.instance_number,
        object_key=_object_key(header),
        size_bytes=header.size_bytes,
        sha256=header.sha256,
        transfer_syntax_uid=header.transfer_syntax_uid,
        rows=header.rows,
        columns=header.columns,
        frames=header.frames,
    )


def _touch(study: Study) -> None:
    """New instances arrived: the quiet period restarts, and a complete study reopens."""
    study.last_instance_at = utcnow()
    if study.status not in (StudyStatus.RECEIVING,):
        # A late instance reopens a study that was already complete: it is processed again whole.
        study.status = StudyStatus.RECEIVING
        study.status_reason = "new instance arrived"


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
