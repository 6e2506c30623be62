"""Reviewing segmentation masks: accept, reject, upload a correction (PNG, NIfTI, DICOM SEG), and
every bad upload refused with its reason while nothing stored changes. On both backends."""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable

import nibabel as nib
import numpy as np
import pytest
from factories import SEGMENTATION_TASK, make_segmentation_study, make_user
from factories import mask_png as png
from numpy.typing import NDArray
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import AuditEvent, Label, Study, StudyStatus, unit_of_work
from radflow.dicom.equipment import Algorithm
from radflow.dicom.seg import build_segmentation, load_sources, part10
from radflow.learning.labels import add_label
from radflow.learning.masks import GroundTruth, load_mask, save_mask
from radflow.learning.retrain import new_labels
from radflow.learning.tasks import get_task
from radflow.services.mask_review import (
    MaskError,
    MaskUpload,
    MaskVerdict,
    predicted_mask,
    review_mask,
)
from radflow.services.study_view import get_study_view, mask_overlay
from radflow.services.users import PermissionDenied, Principal, Role
from radflow.settings import Settings
from radflow.store import ObjectStore

SHAPE = (64, 80)  # rows, columns: not square, so a transposed mask cannot pass


def _probability() -> NDArray[np.float32]:
    probability = np.zeros(SHAPE, dtype=np.float32)
    probability[10:30, 20:50] = 0.8
    probability[40:50, 5:15] = 0.4  # below the threshold: not in the mask
    return probability


def _corrected() -> NDArray[np.bool_]:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[5:20, 30:70] = True
    return mask


def nifti(mask: NDArray[np.generic]) -> bytes:
    # As ITK and MONAI write a 2D image: the first axis runs along the columns.
    return bytes(nib.Nifti1Image(np.asarray(mask, dtype=np.uint8).T, np.eye(4)).to_bytes())


def seg(store: ObjectStore, study: Study, mask: NDArray[np.bool_]) -> bytes:
    """A DICOM SEG of ``mask`` over the study's image (``study`` loaded in a live session)."""
    sources = load_sources(store, [study.series[0].instances[0].object_key])
    task = get_task(SEGMENTATION_TASK)
    algorithm = Algorithm.for_model(SEGMENTATION_TASK, 1)
    return part10(build_segmentation(sources, mask, task.coding.segments, algorithm))


def _setup(
    session_factory: sessionmaker[Session], store: ObjectStore, *, labelled: bool = False
) -> tuple[str, Principal]:
    """A scored segmentation study (and its imported label with a field of view)."""
    with unit_of_work(session_factory) as session:
        study = make_segmentation_study(session, store, _probability())
        rita = make_user(session, "rita")
        if labelled:
            region = np.ones(SHAPE, dtype=bool)
            region[:, :4] = False
            value = save_mask(
                store, study.study_uid, SEGMENTATION_TASK, GroundTruth(_corrected(), region)
            )
            add_label(
                session, study.study_uid, SEGMENTATION_TASK, value, source="import", author="t"
            )
        return study.study_uid, rita


def _review(
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    settings: Settings,
    who: Principal,
    uid: str,
    verdict: MaskVerdict,
    **options: object,
) -> tuple[int | None, int | None]:
    with unit_of_work(session_factory) as session:
        result = review_mask(
            session,
            store,
            settings,
            who,
            uid,
            SEGMENTATION_TASK,
            verdict,
            **options,  # type: ignore[arg-type]
        )
    return result.label_id, result.foreground


def _labels(session_factory: sessionmaker[Session]) -> list[tuple[str, str]]:
    with session_factory() as session:
        return [
            (label.source, label.value)
            for label in session.scalars(select(Label).order_by(Label.id))
        ]


def test_accepting_stores_the_predicted_mask_at_the_threshold_as_the_label(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    uid, rita = _setup(session_factory, store)
    with session_factory() as session:
        shown = predicted_mask(store, get_study_view(session, uid).predictions[0])
        before = new_labels(session, SEGMENTATION_TASK)
    assert np.array_equal(shown, _probability() >= 0.5)

    label_id, foreground = _review(
        session_factory, store, settings, rita, uid, MaskVerdict.ACCEPT, comment="  good  "
    )

    assert foreground == 20 * 30
    with session_factory() as session:
        label = session.get_one(Label, label_id)
        study = session.scalars(select(Study)).one()
        events = {
            e.action: e.details
            for e in session.scalars(select(AuditEvent).where(AuditEvent.object_id == uid))
        }
        assert new_labels(session, SEGMENTATION_TASK) == before + 1  # counts toward retraining
    assert (label.source, label.author, label.comment) == ("review", "rita", "good")
    digest = label.value.removeprefix("mask:")
    assert f"labels/{uid}/{SEGMENTATION_TASK}/mask.{digest}.npz" in set(store.list("labels/"))
    assert np.array_equal(load_mask(store, uid, SEGMENTATION_TASK, label.value).mask, shown)
    assert study.status == StudyStatus.REVIEWED
    assert events["label"]["value"] == label.value
    assert events["review"]["verdict"] == "accept" and events["review"]["label_id"] == label.id


def test_rejecting_records_the_verdict_without_a_label(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    uid, rita = _setup(session_factory, store)
    assert _review(session_factory, store, settings, rita, uid, MaskVerdict.REJECT) == (None, None)
    assert _labels(session_factory) == []
    with session_factory() as session:
        review = session.scalars(select(AuditEvent).where(AuditEvent.action == "review")).one()
        assert session.scalars(select(Study.status)).one() == StudyStatus.REVIEWED
        assert new_labels(session, SEGMENTATION_TASK) == 0
    assert (review.actor, review.details["verdict"], review.details["label_id"]) == (
        "rita",
        "reject",
        None,
    )
    with unit_of_work(session_factory) as session:
        engineer = make_user(session, "max", Role.ML_ENGINEER)
    with pytest.raises(PermissionDenied):
        _review(session_factory, store, settings, engineer, uid, MaskVerdict.REJECT)


def _variant(i: int) -> NDArray[np.bool_]:
    mask = _corrected()
    mask[60:62, i * 10 : i * 10 + 5] = True
    return mask


def test_a_corrected_mask_in_each_format_becomes_the_label_and_keeps_the_field_of_view(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    uid, rita = _setup(session_factory, store, labelled=True)
    imported = load_mask(store, uid, SEGMENTATION_TASK, _labels(session_factory)[0][1])
    with session_factory() as session:
        study = session.scalars(select(Study)).one()
        files = {
            "mask.png": png(_variant(0)),
            "mask.nii": nifti(_variant(1)),
            "mask.nii.gz": gzip.compress(nifti(_variant(2))),
            "mask.dcm": seg(store, study, _variant(3)),
        }
    for i, (name, data) in enumerate(files.items()):
        upload = MaskUpload(name, data)
        _review(session_factory, store, settings, rita, uid, MaskVerdict.CORRECT, upload=upload)
        source, value = _labels(session_factory)[-1]
        stored = load_mask(store, uid, SEGMENTATION_TASK, value)
        assert source == "review"
        assert np.array_equal(stored.mask, _variant(i)), name
        assert imported.region is not None and stored.region is not None
        assert np.array_equal(stored.region, imported.region), name
    assert len(_labels(session_factory)) == 1 + len(files)


def _other_study_seg(session: Session, store: ObjectStore) -> bytes:
    other = make_segmentation_study(session, store, None)
    return seg(store, other, _corrected())


def _jpeg(_: Session, __: ObjectStore) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_corrected().astype(np.uint8) * 255).save(buffer, format="JPEG")
    return buffer.getvalue()


def _grey_levels(_: Session, __: ObjectStore) -> bytes:
    """A grey ramp, as a photograph would be: not a mask."""
    buffer = io.BytesIO()
    Image.fromarray(np.tile(np.arange(80, dtype=np.uint8), (64, 1))).save(buffer, format="PNG")
    return buffer.getvalue()


LIMIT = 64 * 1024
BAD: list[tuple[str, Callable[[Session, ObjectStore], bytes], str, str]] = [
    ("small.png", lambda s, st: png(np.ones((10, 12), bool)), "mask-size", "12x10 but its image"),
    (
        "turned.nii",
        lambda s, st: nifti(_corrected().T),
        "mask-size",
        "64x80 but its image is 80x64",
    ),
    ("empty.png", lambda s, st: png(np.zeros(SHAPE, bool)), "empty-mask", "confirm that"),
    ("notes.txt", lambda s, st: b"vessels everywhere\n" * 20, "unknown-format", "PNG"),
    ("photo.jpg", _jpeg, "unknown-format", "lossless"),
    ("fundus.png", _grey_levels, "mask-values", "holds 80 values"),
    ("other.dcm", _other_study_seg, "unknown-instances", "not images of this study"),
    ("big.png", lambda s, st: png(_corrected()) + b"\0" * LIMIT, "too-large", "at most"),
]


def test_bad_masks_are_refused_with_their_reason_and_the_label_stays(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    uid, rita = _setup(session_factory, store, labelled=True)
    settings = settings.model_copy(update={"mask_upload_max_bytes": LIMIT})
    before, stored = _labels(session_factory), set(store.list("labels/"))
    for name, make, reason, says in BAD:
        with unit_of_work(session_factory) as session:
            data = make(session, store)
        with pytest.raises(MaskError, match=says) as refused:
            _review(
                session_factory,
                store,
                settings,
                rita,
                uid,
                MaskVerdict.CORRECT,
                upload=MaskUpload(name, data),
            )
        assert refused.value.reason == reason, name
        assert _labels(session_factory) == before, name
        assert set(store.list("labels/")) == stored, name
    with session_factory() as session:
        assert session.scalars(select(AuditEvent).where(AuditEvent.action == "review")).all() == []

    # Confirmed, an empty mask is a label: the image shows no vessel.
    label_id, foreground = _review(
        session_factory,
        store,
        settings,
        rita,
        uid,
        MaskVerdict.CORRECT,
        upload=MaskUpload("empty.png", png(np.zeros(SHAPE, bool))),
        confirm_empty=True,
    )
    assert label_id is not None and foreground == 0


def test_the_mask_is_drawn_filled_or_as_its_outline() -> None:
    image = np.zeros((9, 9), dtype=np.uint8)
    mask = np.zeros((9, 9), dtype=bool)
    mask[2:7, 2:7] = True
    filled = mask_overlay(image, mask, 1.0)
    outline = mask_overlay(image, mask, 1.0, contour=True)
    tinted = filled.any(axis=-1)
    assert np.array_equal(tinted, mask)
    assert outline[4, 4].sum() == 0 and outline[2, 4].sum() > 0  # inside clear, edge drawn
    assert outline.any(axis=-1).sum() == 16  # the 5x5 square's border
