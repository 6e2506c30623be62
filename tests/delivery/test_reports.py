"""Reports: every new prediction gets one stored SR (and its SEG registered), queued for the
destinations its routing rule names; a prediction whose SR cannot be made is set aside with
its reason, and the others are reported all the same."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
from dicom_sources import LESION, ct_series, ingest, radiograph, score
from outbound import SEGMENTATION_TASK, rules
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import Delivery, Instance, Prediction, ResultKind, ResultObject
from radflow.delivery.reports import write_reports
from radflow.dicom.equipment import Algorithm
from radflow.dicom.seg import SEG_KEY, load_sources, write_segmentation
from radflow.settings import Settings
from radflow.store import ObjectStore

TWO_PLACES = {"pacs": ("PACS", 104), "archive": ("ARCHIVE", 11112)}


def _results(session_factory: sessionmaker[Session]) -> list[ResultObject]:
    with session_factory() as session:
        return list(session.scalars(select(ResultObject).order_by(ResultObject.id)))


def _deliveries(session_factory: sessionmaker[Session]) -> list[tuple[str, str, str]]:
    with session_factory() as session:
        rows = session.execute(
            select(Delivery.kind, Delivery.destination, Delivery.object_key).order_by(Delivery.id)
        )
        return [(kind.value, destination, key) for kind, destination, key in rows]


def test_a_new_prediction_gets_one_sr_queued_for_each_destination(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    image = radiograph()
    study_uid = ingest([image], tmp_path / "in", settings, session_factory, store)
    score(session_factory, study_uid, 0.9, threshold=0.6)

    run = write_reports(session_factory, store, rules(TWO_PLACES))

    assert (run.written, run.queued, run.failed) == (1, 2, {})
    [sr] = _results(session_factory)
    assert sr.kind == ResultKind.SR and sr.error is None and sr.object_key is not None
    assert sr.object_key.startswith(f"derived/{study_uid}/pneumonia-cxr/v1/sr.")
    report = hd.sr.srread(io.BytesIO(store.get_bytes(sr.object_key)))
    assert report.StudyInstanceUID == study_uid and report.SOPInstanceUID == sr.sop_instance_uid
    [group] = report.content.get_image_measurement_groups()
    assert group.finding_type.meaning == "Pneumonia"
    values = {m.name.meaning: float(m.value) for m in group.get_measurements()}
    assert values == {"Probability": 0.9, "Threshold Value": 0.6}
    assert [source.referenced_sop_instance_uid for source in group.source_images] == [
        image.SOPInstanceUID
    ]
    assert _deliveries(session_factory) == [
        ("sr", "pacs", sr.object_key),
        ("sr", "archive", sr.object_key),
    ]

    # Reported once: a second run finds nothing new.
    again = write_reports(session_factory, store, rules(TWO_PLACES))
    assert (again.written, again.queued) == (0, 0)
    assert len(_results(session_factory)) == 1


def test_superseded_predictions_get_no_report_and_rescoring_gets_a_new_one(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    study_uid = ingest([radiograph()], tmp_path / "in", settings, session_factory, store)
    old = score(session_factory, study_uid, 0.2)
    with session_factory() as session, session.begin():
        session.execute(update(Prediction).where(Prediction.id == old).values(superseded=True))
    new = score(session_factory, study_uid, 0.7)

    run = write_reports(session_factory, store, rules({}))

    assert run.written == 1 and run.queued == 0  # no destination named: stored, not sent
    assert [r.prediction_id for r in _results(session_factory)] == [new]


def test_a_prediction_whose_sr_cannot_be_made_is_set_aside_and_the_others_reported(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    lost, fine = radiograph(), radiograph()
    for image in (lost, fine):
        uid = ingest(
            [image], tmp_path / str(image.SOPInstanceUID), settings, session_factory, store
        )
        score(session_factory, uid, 0.5)
    with session_factory() as session:
        key = session.scalar(
            select(Instance.object_key).where(Instance.sop_instance_uid == lost.SOPInstanceUID)
        )
    assert key is not None
    store.delete(key)

    run = write_reports(session_factory, store, rules(TWO_PLACES))

    assert run.written == 1
    [reason] = run.failed.values()
    assert reason == f"the object {key} is missing from the object store"
    failed, written = sorted(_results(session_factory), key=lambda r: r.error is None)
    assert failed.error == reason and failed.object_key is None
    assert written.object_key is not None
    assert len(_deliveries(session_factory)) == 2  # only the reported study is queued
    # Set aside, not retried on every run.
    assert write_reports(session_factory, store, rules(TWO_PLACES)).failed == {}


def test_a_segmentation_reports_its_seg_which_is_queued_before_the_sr(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    tmp_path: Path,
    segmentation_task: str,
) -> None:
    series = ct_series(slices=3)
    study_uid = ingest(series, tmp_path / "in", settings, session_factory, store)
    with session_factory() as session:
        object_keys = session.scalars(select(Instance.object_key).order_by(Instance.number)).all()
    mask = np.zeros((3, 32, 32), bool)
    mask[1, 0:4, 0:5] = True  # 20 voxels
    seg = write_segmentation(
        store,
        load_sources(store, object_keys),
        mask,
        [LESION],
        Algorithm.for_model(SEGMENTATION_TASK, 1),
        task=SEGMENTATION_TASK,
        version=1,
    )
    score(session_factory, study_uid, 1.0, task=SEGMENTATION_TASK, derived={SEG_KEY: seg.key})

    run = write_reports(
        session_factory, store, rules({"pacs": ("PACS", 104)}, task=SEGMENTATION_TASK)
    )

    assert (run.written, run.queued, run.failed) == (1, 2, {})
    sr, registered = sorted(_results(session_factory), key=lambda r: r.kind.value, reverse=True)
    assert (registered.kind, registered.object_key) == (ResultKind.SEG, seg.key)
    assert registered.sop_instance_uid == seg.sop_instance_uid
    assert [kind for kind, _, _ in _deliveries(session_factory)] == ["seg", "sr"]
    assert sr.object_key is not None
    report = hd.sr.srread(io.BytesIO(store.get_bytes(sr.object_key)))
    [group] = report.content.get_volumetric_roi_measurement_groups()
    assert group.referenced_segment.referenced_sop_instance_uid == seg.sop_instance_uid
    [volume] = group.get_measurements()
    assert float(volume.value) == 20 * 0.7 * 0.7 * 2.5


def test_an_empty_segmentation_is_reported_as_zero_without_a_seg(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    tmp_path: Path,
    segmentation_task: str,
) -> None:
    study_uid = ingest(ct_series(slices=3), tmp_path / "in", settings, session_factory, store)
    score(session_factory, study_uid, 0.0, task=SEGMENTATION_TASK)  # no SEG: the mask was empty

    run = write_reports(session_factory, store, rules({}, task=SEGMENTATION_TASK))

    assert run.written == 1
    [sr] = _results(session_factory)
    assert sr.object_key is not None
    report = hd.sr.srread(io.BytesIO(store.get_bytes(sr.object_key)))
    [group] = report.content.get_image_measurement_groups()
    assert [(m.name.meaning, float(m.value)) for m in group.get_measurements()] == [("Volume", 0.0)]
    assert len(group.source_images) == 3  # every slice of the routed series


def test_a_seg_of_another_studys_images_is_set_aside_and_the_others_reported(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    tmp_path: Path,
    segmentation_task: str,
) -> None:
    ours, theirs = ct_series(slices=2), ct_series(slices=2)
    study_uids = [
        ingest(series, tmp_path / str(i), settings, session_factory, store)
        for i, series in enumerate((ours, theirs))
    ]
    mask = np.ones((2, 32, 32), bool)
    algorithm = Algorithm.for_model(SEGMENTATION_TASK, 1)
    wrong = write_segmentation(  # made from the other study's images
        store, theirs, mask, [LESION], algorithm, task=SEGMENTATION_TASK, version=1
    )
    right = write_segmentation(
        store, theirs, mask, [LESION], algorithm, task=SEGMENTATION_TASK, version=1
    )
    for study_uid, seg in zip(study_uids, (wrong, right), strict=True):
        score(session_factory, study_uid, 1.0, task=SEGMENTATION_TASK, derived={SEG_KEY: seg.key})

    run = write_reports(session_factory, store, rules({}, task=SEGMENTATION_TASK))

    assert run.written == 1
    [reason] = run.failed.values()
    assert reason.startswith("unknown-instances: the SEG references 2 instance(s) that are not")
    assert store.exists(wrong.key)  # nothing stored is lost
