"""Ingest: validated DICOM files into the object store (originals) and the database (index).

The object is written before the index row, and the key is a function of the UIDs and the
content's digest (radflow/store/keys.py), so a crash between the two leaves nothing an ingest
re-run does not repair, and a refused file never overwrites an indexed one.

**One file never stops the others.** Whatever processing a file raises is one of two things.
An outage (:func:`radflow.outages.is_outage`: the database, the object store, the disk) says
nothing about the file: it propagates, the caller keeps the file and tries again later, and
nothing is refused. Anything else fails the same way on every attempt, so the file is refused
with a reason (an :class:`~radflow.errors.InvalidInstance` code, or ``unprocessable`` for an
error nobody foresaw, whose traceback is logged once per distinct failure, see
:func:`refusal`) and the next file goes on. A batch (:func:`ingest_batch`) that fails for such
a reason is split in halves until the file(s) at fault are alone; the others commit.

**Copies of one instance.** The same SOP Instance UID again with the same bytes is a
duplicate. With other bytes (another transfer syntax, RLE or JPEG-LS or JPEG 2000 lossless,
group lengths, only the file meta changed...), the first copy stored is kept (in arrival order:
the order of ``paths`` or ``items``) and the later one is still a duplicate if it is the same
image: same patient, study and series, and equal decoded pixels (a hash of the pixel data
decoded by :mod:`radflow.dicom.pixels`, computed only when the digests differ). Anything else
is a real conflict: refused as ``uid-conflict`` with both digests in the message, the file kept
by the caller (the watch folder's quarantine, the receiver's ``spool/rejected``, the ingest
report).

**Values and their columns.** PostgreSQL refuses text with a NUL character, text longer than
its column and integers outside the column's type, where SQLite stores them: every value is
checked against its column (:mod:`radflow.db.imaging`) before the batch is written, so both
backends index the same way:

- UIDs (the instance's identity and storage key) that are not valid UIDs: refused,
  ``invalid-uid``: an altered UID would be another instance.
- Rows, Columns, NumberOfFrames outside 1..the column's maximum (NumberOfFrames 3x10^10):
  refused, ``bad-dimensions``: without its geometry an image cannot be used at all.
- Descriptive text (accession number, study date and description, series description,
  modality, body part, image type) with a NUL character or longer than its column, and Series
  or Instance Numbers or Temporal Position Indexes outside the INTEGER range (999999999999, or
  20 digits: legal IS values):
  stored as NULL, and the instance indexed. The image is sound and may already be
  acknowledged; these values only describe and order it. NULL rather than a cleaned value,
  because a truncated accession number or number may match another study's or invent an
  order, and a routing rule sees "no value" rather than a wrong one. Each such value is
  recorded: a Rejection row of source ``warning`` and reason ``value-dropped`` (counted by
  ``radflow status``, listed by the dashboard), written in the transaction that indexes the
  instance, a log line, and ``IngestReport.warnings``.
"""

from __future__ import annotations

import hashlib
import logging
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

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
from radflow.dicom.pixels import to_array
from radflow.dicom.pseudonym import pseudonymise
from radflow.errors import VALUE_DROPPED, ConflictingInstance, InvalidInstance, Unprocessable
from radflow.ingest.stability import promote
from radflow.outages import describe, is_outage
from radflow.settings import Settings
from radflow.store import ObjectStore, keys

logger = logging.getLogger(__name__)

# SOP Instance UIDs per lookup query: well under every backend's bound-parameter limit.
_UID_CHUNK = 500
# Rejection.source of a value stored as NULL (the instance itself is indexed).
WARNING_SOURCE = "warning"
# Distinct failures whose traceback was logged (bounded: a process never holds more).
_MAX_REMEMBERED_FAILURES = 1000
_logged_failures: set[tuple[str, ...]] = set()

_UID_FIELDS = ("sop_instance_uid", "sop_class_uid", "series_uid", "study_uid")
_DIMENSIONS = {"rows": Instance.rows, "columns": Instance.columns, "frames": Instance.frames}
_TEXT_COLUMNS: dict[str, InstrumentedAttribute[str | None]] = {
    "accession_number": Study.accession_number,
    "study_date": Study.study_date,
    "study_description": Study.description,
    "series_description": Series.description,
    "modality": Series.modality,
    "body_part": Series.body_part,
    "image_type": Series.image_type,
}
_NUMBER_COLUMNS = {
    "series_number": Series.number,
    "instance_number": Instance.number,
    "temporal_position": Instance.temporal_position,
}

Item = tuple[Path, InstanceHeader]


@dataclass(frozen=True)
class Outcome:
    """What ingesting one file did: stored it (``new``), found it stored, or refused it."""

    study_uid: str | None = None  # None when refused
    new: bool = False
    refused: InvalidInstance | None = None
    warnings: tuple[str, ...] = ()  # values stored as NULL (reason value-dropped)


@dataclass
class IngestReport:
    stored: int = 0
    duplicates: int = 0
    rejected: dict[str, str] = field(default_factory=dict)  # path -> "reason: message"
    reasons: Counter[str] = field(default_factory=Counter)
    study_uids: set[str] = field(default_factory=set)
    warnings: dict[str, list[str]] = field(default_factory=dict)  # path -> values dropped

    def count(self, study_uid: str, is_new: bool) -> None:
        """Account for one accepted file: newly stored, or a duplicate of a stored instance."""
        self.study_uids.add(study_uid)
        if is_new:
            self.stored += 1
        else:
            self.duplicates += 1

    def reject(self, path: str, exc: InvalidInstance) -> None:
        self.rejected[path] = f"{exc.reason}: {exc}"
        self.reasons[exc.reason] += 1

    def add(self, path: str, outcome: Outcome) -> None:
        if outcome.warnings:
            self.warnings[path] = list(outcome.warnings)
        if outcome.refused is not None:
            self.reject(path, outcome.refused)
        elif outcome.study_uid is not None:
            self.count(outcome.study_uid, outcome.new)

    def summary(self) -> str:
        text = f"stored {self.stored}, duplicates {self.duplicates}, rejected {len(self.rejected)}"
        if self.warnings:
            text += f", stored with values dropped {len(self.warnings)}"
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
    """Ingest each file; a refused file is reported (and recorded) and never stops the others.

    Outages propagate: nothing was refused for them, and a re-run finishes the job.
    """
    report = IngestReport()
    for path in paths:
        outcome = ingest_file(path, settings=settings, session_factory=session_factory, store=store)
        report.add(str(path), outcome)
        if outcome.refused is not None:
            logger.warning("rejected %s: %s", path.name, outcome.refused.reason)
            with unit_of_work(session_factory) as session:
                session.add(rejection("ingest", outcome.refused, origin=path.name))
    return report


def ingest_file(
    path: Path,
    *,
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
) -> Outcome:
    """Validate, store and index one file in its own transaction.

    A file Radflow refuses, for whatever reason but an outage, comes back as a refused
    outcome (recording it is the caller's business); outages propagate.
    """
    try:
        header = read_header(path, settings.max_pixels)
    except Exception as exc:
        if is_outage(exc):
            raise
        return Outcome(refused=refusal(exc, path.name))
    key = settings.pseudonym_key.get_secret_value()
    (outcome,) = _index_isolated([(path, header)], key, session_factory, store, immutable=False)
    return outcome


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
    file. A batch that fails for a reason of its data is split in halves, and so on, until the
    files at fault are alone: they are refused, every other file commits. Outages (database,
    object store) propagate: the caller keeps the files (halves committed before the outage
    are found as duplicates on the next attempt). ``report.rejected`` is keyed by path.
    ``immutable``: the caller never changes the files (see
    :meth:`radflow.store.ObjectStore.put_files`).
    """
    key = settings.pseudonym_key.get_secret_value()
    report = IngestReport()
    outcomes = _index_isolated(items, key, session_factory, store, immutable=immutable)
    for (path, _), outcome in zip(items, outcomes, strict=True):
        report.add(str(path), outcome)
    return report


def refusal(exc: Exception, origin: str) -> InvalidInstance:
    """The refusal to record for ``origin``, whose processing raised ``exc`` (not an outage).

    An InvalidInstance is its own refusal. Anything else is ``unprocessable``, and logged: with
    its traceback the first time this process meets this failure (its type and the lines that
    raised it), as one line afterwards, so a bug that fails every file logs one traceback, not
    one per file or per retry.
    """
    if isinstance(exc, InvalidInstance):
        return exc
    frames = traceback.extract_tb(exc.__traceback__)
    signature = (type(exc).__qualname__, *(f"{f.filename}:{f.lineno}" for f in frames))
    first = signature not in _logged_failures
    if first and len(_logged_failures) < _MAX_REMEMBERED_FAILURES:
        _logged_failures.add(signature)
    traceback_once = exc if first else None
    logger.error("%s could not be processed (%s)", origin, describe(exc), exc_info=traceback_once)
    return Unprocessable(
        f"{origin}: processing failed with {describe(exc)}; the file is set aside and the "
        "error is logged with its traceback: report it to the Radflow maintainers with the file"
    )


def rejection(
    source: str, exc: InvalidInstance, *, origin: str | None, quarantine_key: str | None = None
) -> Rejection:
    """The row that makes a refused input visible (``radflow status``); never silent."""
    return Rejection(
        source=source,
        reason=exc.reason,
        message=_storable(str(exc), 1024),
        origin=_storable(origin, 255) if origin else None,
        quarantine_key=_storable(quarantine_key, 255) if quarantine_key else None,
    )


def _storable(text: str, limit: int) -> str:
    """``text`` as every backend stores it: no NUL, no lone surrogate (an undecodable file
    name), at most ``limit`` characters. For messages and names, never for indexed values."""
    cleaned = text.replace("\0", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
    return cleaned[:limit]


def _index_isolated(
    items: Sequence[Item],
    pseudonym_key: str,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    *,
    immutable: bool,
) -> list[Outcome]:
    """Index ``items`` in one transaction; if that fails for a reason of the data, in halves.

    Objects a failed attempt wrote for files refused in the end are deleted again (unless a
    row points to them): a refused file leaves nothing in the store.
    """

    def attempt(part: Sequence[Item]) -> list[Outcome]:
        with unit_of_work(session_factory) as session:
            return index_instances(session, store, part, pseudonym_key, immutable=immutable)

    try:
        outcomes = attempt(items)
    except Exception as exc:
        if is_outage(exc):
            raise
        if len(items) > 1:
            logger.info(
                "a batch of %d failed (%s); indexing it in halves to find the file(s) at fault",
                len(items),
                describe(exc),
            )
        outcomes = _split(items, exc, attempt)
        for (_, header), outcome in zip(items, outcomes, strict=True):
            if outcome.refused is not None:
                _discard_unreferenced(session_factory, store, header)
    for (path, _), outcome in zip(items, outcomes, strict=True):
        for warning in outcome.warnings:
            logger.warning("%s: %s", path.name, warning)
    return outcomes


def _split(
    items: Sequence[Item], failure: Exception, attempt: Callable[[Sequence[Item]], list[Outcome]]
) -> list[Outcome]:
    """Outcomes of ``items``, whose transaction failed with ``failure``, found by bisection."""
    if len(items) == 1:
        if isinstance(failure, IntegrityError):
            # A concurrent writer committed rows of this instance (its study, series or itself)
            # between this transaction's lookups and its insert: looking again sees them.
            logger.info("a concurrent writer indexed rows of this instance first; looking again")
            try:
                return attempt(items)
            except Exception as exc:
                if is_outage(exc):
                    raise
                failure = exc
        return [Outcome(refused=refusal(failure, items[0][0].name))]
    outcomes: list[Outcome] = []
    half = len(items) // 2
    for part in (items[:half], items[half:]):
        try:
            outcomes += attempt(part)
        except Exception as exc:
            if is_outage(exc):
                raise
            outcomes += _split(part, exc, attempt)
    return outcomes


def _discard_unreferenced(
    session_factory: sessionmaker[Session], store: ObjectStore, header: InstanceHeader
) -> None:
    try:
        key = _object_key(header)
    except ValueError:  # no key can be made of its UIDs: nothing was written
        return
    with session_factory() as session:
        indexed = session.scalar(
            select(Instance.object_key).where(Instance.sop_instance_uid == header.sop_instance_uid)
        )
    if indexed != key:
        store.delete(key)


def index_instances(
    session: Session,
    store: ObjectStore,
    items: Sequence[Item],
    pseudonym_key: str,
    *,
    immutable: bool = False,
) -> list[Outcome]:
    """Store and index instances; the outcome of each, in order.

    Set-wise, so a batch costs a few queries and one store write, not several per instance:
    one lookup of the UIDs already indexed, one per new series, one ``put_files``. Files
    refused here (values, UID conflicts) are not written; errors raised are the caller's.
    """
    outcomes: list[Outcome | None] = [None] * len(items)
    for n, (path, header) in enumerate(items):
        problem = _identity_problem(header, path.name)
        if problem is not None:
            outcomes[n] = Outcome(refused=problem)
    valid = [header for (_, header), o in zip(items, outcomes, strict=True) if o is None]
    known = _indexed_digests(session, [header.sop_instance_uid for header in valid])
    first: dict[str, _Copy] = {}  # UID -> the copy kept: indexed before, or earlier in items
    fresh: list[tuple[Path, InstanceHeader, tuple[str, ...]]] = []
    for n, (path, header) in enumerate(items):
        if outcomes[n] is not None:
            continue
        uid = header.sop_instance_uid
        if uid not in first and uid in known:
            if known[uid] == header.sha256:  # the usual re-send: no need to look further
                outcomes[n] = Outcome(header.study_uid)
                continue
            first[uid] = _indexed_copy(session, store, uid, known[uid])
        if uid in first:
            conflict = first[uid].conflict(path, header, pseudonym_key)
            outcomes[n] = Outcome(refused=conflict) if conflict else Outcome(header.study_uid)
            continue
        try:
            checked, warnings = _check_values(header, path.name)
        except InvalidInstance as exc:
            outcomes[n] = Outcome(refused=exc)
            continue
        first[uid] = _Copy.of_file(path, header, pseudonym_key)
        fresh.append((path, checked, warnings))
        outcomes[n] = Outcome(header.study_uid, new=True, warnings=warnings)
    _write(session, store, fresh, pseudonym_key, immutable=immutable)
    return [o for o in outcomes if o is not None]


def _write(
    session: Session,
    store: ObjectStore,
    fresh: Sequence[tuple[Path, InstanceHeader, tuple[str, ...]]],
    pseudonym_key: str,
    *,
    immutable: bool,
) -> None:
    store.put_files(
        [(_object_key(header), path) for path, header, _ in fresh],
        "application/dicom",
        immutable=immutable,
    )
    series: dict[str, Series] = {}
    for path, header, warnings in fresh:
        if header.series_uid not in series:
            series[header.series_uid] = _series(session, header, pseudonym_key)
        session.add(_instance_row(header, series[header.series_uid]))
        for warning in warnings:
            dropped = InvalidInstance(VALUE_DROPPED, f"{path.name}: {warning}")
            session.add(rejection(WARNING_SOURCE, dropped, origin=path.name))
    for study in {id(s.study): s.study for s in series.values()}.values():
        _touch(study)


def _identity_problem(header: InstanceHeader, name: str) -> InvalidInstance | None:
    for what in _UID_FIELDS:
        try:
            keys.check_uid(getattr(header, what), what)
        except ValueError as exc:
            return InvalidInstance("invalid-uid", f"{name}: {exc}")
    return None


def _check_values(header: InstanceHeader, name: str) -> tuple[InstanceHeader, tuple[str, ...]]:
    """``header`` with the values its columns cannot hold dropped (None), and why, per value.

    Raises InvalidInstance (``bad-dimensions``) for a geometry the index cannot hold. The
    rules, and why, are in this module's docstring.
    """
    for what, dimension in _DIMENSIONS.items():
        value = getattr(header, what)
        if not 1 <= value <= _range(dimension)[1]:
            raise InvalidInstance(
                "bad-dimensions",
                f"{name}: {what} {value} is outside 1..{_range(dimension)[1]}; no image has that "
                "geometry: the sender's header is wrong",
            )
    dropped: dict[str, Any] = {}
    warnings: list[str] = []
    for what, text in _TEXT_COLUMNS.items():
        problem = _text_problem(getattr(header, what), _length(text))
        if problem is not None:
            dropped[what] = None
            warnings.append(f"{what} {problem}; indexed without it")
    for what, column in _NUMBER_COLUMNS.items():
        number, (low, high) = getattr(header, what), _range(column)
        if number is not None and not low <= number <= high:
            dropped[what] = None
            warnings.append(
                f"{what} {number} is outside the range of the index's integers "
                f"({low}..{high}); indexed without it"
            )
    # Values reading already set aside (radflow.dicom.instance: not a number, or beyond 32 bits).
    warnings += [
        f"{keyword} is not a number the index's integers hold; indexed without it"
        for keyword in header.unusable
    ]
    return (replace(header, **dropped) if dropped else header), tuple(warnings)


def _range(column: InstrumentedAttribute[Any]) -> tuple[int, int]:
    """The values an integer column holds on every backend (PostgreSQL's INTEGER, BIGINT)."""
    bits = 64 if isinstance(column.type, BigInteger) else 32
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _length(column: InstrumentedAttribute[str | None]) -> int:
    column_type = column.type
    assert isinstance(column_type, String) and column_type.length is not None  # see _TEXT_COLUMNS
    return column_type.length


def _text_problem(value: str | None, limit: int) -> str | None:
    # No value is shown: descriptions may name people, and this goes to logs.
    if value is None:
        return None
    if "\0" in value:
        return "contains a NUL character, which the database cannot store"
    if len(value) > limit:
        return f"is {len(value)} characters long, its column holds {limit}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode text"
    return None


@dataclass
class _Copy:
    """The copy of an instance that is kept, as a later copy with other bytes is compared to.

    Its identity and pixels are worked out only when such a copy comes (rarely).
    """

    sha256: str
    identify: Callable[[], tuple[str, str, str]]  # patient pseudonym, study UID, series UID
    read: Callable[[], bytes]

    @classmethod
    def of_file(cls, path: Path, header: InstanceHeader, pseudonym_key: str) -> _Copy:
        return cls(header.sha256, lambda: _identity(header, pseudonym_key), path.read_bytes)

    @cached_property
    def identity(self) -> tuple[str, str, str]:
        return self.identify()

    @cached_property
    def pixels(self) -> str:
        return _pixel_digest(self.read())

    def conflict(
        self, path: Path, header: InstanceHeader, pseudonym_key: str
    ) -> ConflictingInstance | None:
        """None if ``header`` (of ``path``) is this instance again, else why it is not."""
        if header.sha256 == self.sha256:
            return None
        names = ("patient", "study", "series")
        other = _identity(header, pseudonym_key)
        differ = [n for n, a, b in zip(names, self.identity, other, strict=True) if a != b]
        if differ:
            difference = f"belongs to another {' and '.join(differ)}"
        else:
            try:
                if self.pixels == _pixel_digest(path.read_bytes()):
                    logger.info("%s: another encoding of an indexed instance", path.name)
                    return None
                difference = "has other pixel data"
            except Exception as exc:
                if is_outage(exc):
                    raise
                difference = f"has pixel data that cannot be decoded to compare ({describe(exc)})"
        return ConflictingInstance(header.sop_instance_uid, self.sha256, header.sha256, difference)


def _identity(header: InstanceHeader, pseudonym_key: str) -> tuple[str, str, str]:
    return (_pseudonym(header.patient_id, pseudonym_key), header.study_uid, header.series_uid)


def _pixel_digest(data: bytes) -> str:
    """SHA-256 of the decoded pixels (and their shape): equal for every lossless encoding."""
    pixels = to_array(data)
    digest = hashlib.sha256(repr(pixels.shape).encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()


def _indexed_copy(session: Session, store: ObjectStore, uid: str, sha256: str) -> _Copy:
    row = session.execute(
        select(Instance.object_key, Patient.pseudonym, Study.study_uid, Series.series_uid)
        .join(Instance.series)
        .join(Series.study)
        .join(Study.patient)
        .where(Instance.sop_instance_uid == uid)
    ).one()
    object_key, pseudonym, study_uid, series_uid = row
    return _Copy(
        sha256, lambda: (pseudonym, study_uid, series_uid), lambda: store.get_bytes(object_key)
    )


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
        image_type=header.image_type,
        image_position=_floats(header.image_position),
        image_orientation=_floats(header.image_orientation),
        pixel_spacing=_floats(header.pixel_spacing),
        temporal_position=header.temporal_position,
    )


def _floats(values: tuple[float, ...] | None) -> list[float] | None:
    return list(values) if values is not None else None


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


def _pseudonym(patient_id: str, pseudonym_key: str) -> str:
    return pseudonymise(patient_id or "(no patient id)", pseudonym_key)


def _patient(session: Session, patient_id: str, pseudonym_key: str) -> Patient:
    pseudonym = _pseudonym(patient_id, pseudonym_key)
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
