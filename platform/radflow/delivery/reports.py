"""Reports: an SR for every new prediction, stored, and queued with its SEG for the destinations
its routing rule names.

A prediction is new when it is current (not superseded) and has no SR result yet; scoring is
not touched, the database says what is left. For each one:

- classification: the finding of the task (``Task.coding.finding``), its probability, the
  model's threshold and version, over the image routing chose (the one that was scored);
- segmentation with a SEG (``derived_keys[radflow.dicom.seg.SEG_KEY]``, written by scoring
  through radflow.dicom.seg.write_segmentation): each segment's area or volume, referencing
  the SEG, which is registered as a result too;
- segmentation without a SEG (its mask was empty): zero for every segment.

The SR's UIDs come from the prediction, so writing it again (a crash between the store and the
database) makes the same object. A prediction whose SR cannot be made (its image is missing,
the study no longer routes to the task, the SEG is bad) gets a result row with the reason
instead of a key: it is set aside, listed on the pipeline page, and not tried on every run.
Outages (database, object store) are raised: nothing is recorded and the next run tries again.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from datetime import datetime

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import ColumnElement, exists, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from radflow.db import (
    Instance,
    Prediction,
    ResultKind,
    ResultObject,
    Series,
    Study,
    unit_of_work,
)
from radflow.delivery.outbox import enqueue, reason_for
from radflow.dicom.equipment import Algorithm
from radflow.dicom.seg import (
    SEG_KEY,
    load_sources,
    part10,
    read_segmentation,
    referenced_instances,
)
from radflow.dicom.sr import (
    Finding,
    ReportIdentity,
    classification_report,
    empty_measurements,
    segment_measurements,
    segmentation_report,
)
from radflow.errors import RadflowError
from radflow.ingest.routing import Image, Routed, RoutingRules, candidates, route_series
from radflow.learning.tasks import Task, get_task
from radflow.outages import FailureLog, is_outage
from radflow.store import ObjectStore, keys

logger = logging.getLogger(__name__)

PAGE = 200
"""Predictions read per query; the query runs again until none is left."""


class ReportError(RadflowError):
    """A prediction whose SR cannot be made, for a reason retrying does not change."""


@dataclass
class ReportRun:
    written: int = 0
    queued: int = 0
    failed: dict[int, str] = field(default_factory=dict)  # prediction id -> reason

    def add(self, other: ReportRun) -> None:
        self.written += other.written
        self.queued += other.queued
        self.failed.update(other.failed)

    def summary(self) -> str:
        return (
            f"reports written {self.written}, deliveries queued {self.queued}, "
            f"set aside {len(self.failed)}"
        )


@dataclass(frozen=True)
class _Made:
    """An SR built for a prediction, and what is to be recorded and sent with it."""

    prediction_id: int
    study_id: int
    report: Dataset
    key: str
    seg: tuple[str, str] | None  # (object key, SOP Instance UID) of the prediction's SEG
    destinations: tuple[str, ...]


def write_reports(
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    rules: RoutingRules | None = None,
    *,
    page: int = PAGE,
) -> ReportRun:
    """Write the SR of every new prediction and queue it (and its SEG) for its destinations.

    ``rules``: the site's routing rules (radflow.ingest.routing.rules_for); None: the packaged.
    """
    run = ReportRun()
    failures = FailureLog(logger)
    while True:
        with session_factory() as session:
            ids = session.scalars(
                select(Prediction.id).where(_unreported()).order_by(Prediction.id).limit(page)
            ).all()
        if not ids:
            return run
        for prediction_id in ids:
            _report(session_factory, store, rules, prediction_id, run, failures)


def has_unreported(session: Session) -> bool:
    """Whether any current prediction still waits for its SR (or its reason it has none)."""
    return session.scalar(select(Prediction.id).where(_unreported()).limit(1)) is not None


def _unreported() -> ColumnElement[bool]:
    has_report = exists().where(
        ResultObject.prediction_id == Prediction.id, ResultObject.kind == ResultKind.SR
    )
    return ~Prediction.superseded & ~has_report


def _report(
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    rules: RoutingRules | None,
    prediction_id: int,
    run: ReportRun,
    failures: FailureLog,
) -> None:
    try:
        with session_factory() as session:
            made = _make(session, store, rules, prediction_id)
    except Exception as exc:
        # Classified, not swallowed: outages are raised for a later run, the rest recorded.
        if is_outage(exc):
            raise
        failures.failed(f"the SR of prediction {prediction_id}", exc)
        reason = reason_for(exc)
        _set_aside(session_factory, prediction_id, reason)
        run.failed[prediction_id] = reason
        return
    store.put_bytes(made.key, part10(made.report), content_type="application/dicom")
    try:
        with unit_of_work(session_factory) as session:
            run.queued += _record(session, made)
    except IntegrityError:
        logger.info("prediction %s was reported by another run meanwhile", prediction_id)
        return
    run.written += 1


def _make(
    session: Session, store: ObjectStore, rules: RoutingRules | None, prediction_id: int
) -> _Made:
    prediction = session.scalars(
        select(Prediction)
        .where(Prediction.id == prediction_id)
        .options(selectinload(Prediction.study), selectinload(Prediction.model_version))
    ).one()
    task = get_task(prediction.task)
    study = prediction.study
    routed = _route(session, study, task, rules)
    assert routed.instance is not None and routed.rule is not None  # _route raised otherwise
    algorithm = Algorithm.for_model(task.name, prediction.model_version.version)
    identity = _identity(study.study_uid, prediction)
    seg_key = (prediction.derived_keys or {}).get(SEG_KEY)
    seg: tuple[str, str] | None = None
    if seg_key:
        report, seg_uid = _segmentation(session, store, study, task, algorithm, identity, seg_key)
        seg = (seg_key, seg_uid)
    elif task.coding.segments:
        # Scoring writes no SEG for an empty mask (radflow.dicom.seg.EmptyMask): zero, said.
        sources = load_sources(store, _series_keys(session, routed.instance))
        frames = sum(int(s.get("NumberOfFrames") or 1) for s in sources)
        report = segmentation_report(
            sources,
            empty_measurements(frames, task.coding.segments),
            algorithm,
            procedure=task.coding.procedure,
            identity=identity,
        )
    else:
        report = _classification(store, prediction, task, routed.instance, algorithm, identity)
    name = f"sr.{identity.sop_instance_uid}.dcm"
    return _Made(
        prediction_id=prediction.id,
        study_id=study.id,
        report=report,
        key=keys.derived(study.study_uid, task.name, prediction.model_version.version, name),
        seg=seg,
        destinations=routed.rule.send_to,
    )


def _route(session: Session, study: Study, task: Task, rules: RoutingRules | None) -> Routed:
    routed = route_series(candidates(session, [study.id]).get(study.id, []), task, rules)
    if routed.instance is None:
        raise ReportError(
            f"the study no longer routes to {task.name} ({routed.reason}); fix the routing "
            "rules, then score it again"
        )
    return routed


def _identity(study_uid: str, prediction: Prediction) -> ReportIdentity:
    """The SR's UIDs, derived from the prediction: the same SR every time it is written."""
    version = prediction.model_version.version
    created: datetime = prediction.created_at
    return ReportIdentity(
        series_instance_uid=generate_uid(
            entropy_srcs=["radflow-sr-series", study_uid, prediction.task, str(version)]
        ),
        sop_instance_uid=generate_uid(
            entropy_srcs=["radflow-sr", study_uid, str(prediction.id), created.isoformat()]
        ),
        content=created,
    )


def _classification(
    store: ObjectStore,
    prediction: Prediction,
    task: Task,
    image: Image,
    algorithm: Algorithm,
    identity: ReportIdentity,
) -> Dataset:
    concept = task.coding.finding
    if concept is None:
        raise ReportError(
            f"task {task.name} declares no coded finding (Task.coding.finding); declare the "
            "concept of its positive label to report it"
        )
    probability = float((prediction.scores or {}).get(task.positive, prediction.score))
    finding = Finding(concept, probability, float(prediction.model_version.threshold))
    return classification_report(
        load_sources(store, [image.object_key]),
        finding,
        algorithm,
        procedure=task.coding.procedure,
        identity=identity,
    )


def _segmentation(
    session: Session,
    store: ObjectStore,
    study: Study,
    task: Task,
    algorithm: Algorithm,
    identity: ReportIdentity,
    seg_key: str,
) -> tuple[Dataset, str]:
    """The SR over a prediction's SEG, and the SEG's SOP Instance UID."""
    data = store.get_bytes(seg_key)
    segmentation = pydicom.dcmread(io.BytesIO(data))
    object_keys = session.scalars(
        select(Instance.object_key)
        .join(Series, Series.id == Instance.series_id)
        .where(
            Series.study_id == study.id,
            Instance.sop_instance_uid.in_(referenced_instances(segmentation)),
        )
        .order_by(Instance.number, Instance.id)
    ).all()
    sources = load_sources(store, object_keys)
    mask = read_segmentation(data, sources)  # checks the SEG against this study's images
    report = segmentation_report(
        sources,
        segment_measurements(mask, task.coding.segments),
        algorithm,
        segmentation=segmentation,
        procedure=task.coding.procedure,
        identity=identity,
    )
    return report, str(segmentation.SOPInstanceUID)


def _series_keys(session: Session, first: Image) -> list[str]:
    """Object keys of every instance of the series ``first`` belongs to, in number order."""
    series_id = (
        select(Instance.series_id).where(Instance.object_key == first.object_key).scalar_subquery()
    )
    return list(
        session.scalars(
            select(Instance.object_key)
            .where(Instance.series_id == series_id)
            .order_by(Instance.number, Instance.id)
        )
    )


def _record(session: Session, made: _Made) -> int:
    """The SR (and SEG) result rows and their deliveries; how many deliveries were queued."""
    session.add(
        ResultObject(
            prediction_id=made.prediction_id,
            study_id=made.study_id,
            kind=ResultKind.SR,
            object_key=made.key,
            sop_instance_uid=made.report.SOPInstanceUID,
        )
    )
    queued = 0
    if made.seg is not None:
        seg_key, seg_uid = made.seg
        session.add(
            ResultObject(
                prediction_id=made.prediction_id,
                study_id=made.study_id,
                kind=ResultKind.SEG,
                object_key=seg_key,
                sop_instance_uid=seg_uid,
            )
        )
        # The SEG first: a PACS then holds what the SR references when the SR arrives.
        queued += enqueue(session, made.study_id, ResultKind.SEG, seg_key, made.destinations)
    session.flush()
    queued += enqueue(session, made.study_id, ResultKind.SR, made.key, made.destinations)
    return queued


def _set_aside(session_factory: sessionmaker[Session], prediction_id: int, reason: str) -> None:
    with contextlib.suppress(IntegrityError), unit_of_work(session_factory) as session:
        # (an IntegrityError: another run recorded this prediction meanwhile)
        study_id = session.scalar(select(Prediction.study_id).where(Prediction.id == prediction_id))
        session.add(
            ResultObject(
                prediction_id=prediction_id,
                study_id=study_id,
                kind=ResultKind.SR,
                error=reason[:1024],
            )
        )
