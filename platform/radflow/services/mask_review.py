"""Reviewing a segmentation: the predicted mask at its model's threshold, accepted, rejected or
replaced by a corrected mask the reviewer uploads.

An accepted or corrected mask becomes the study's label for the task, stored as an imported
one is (radflow.learning.masks.save_mask: ``labels/<study>/<task>/mask.<digest>.npz``, and a
``mask:<digest>`` label with source "review" through radflow.learning.labels.add_label), so
training learns from it and it counts toward retraining. It keeps the field of view of the
study's previous mask, if it had one. A rejection records the verdict and no label. Each
outcome is audited ("review", and "label" for a new label) and marks the study REVIEWED.

A refused mask raises MaskError with a reason and changes nothing: no object stored, no row
added, the previous label stays the study's label. An empty mask is refused unless the reviewer
confirms that the image shows none of the structure (``confirm_empty``): a stray upload of a
blank picture must not teach the model that a fundus has no vessels. The caller commits
(``unit_of_work``).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from radflow.db import Label, Prediction, Study, StudyStatus
from radflow.db.audit import record
from radflow.dicom.seg import load_sources
from radflow.ingest.routing import candidates, route_series, route_studies, rules_for
from radflow.learning.labels import add_label
from radflow.learning.mask_files import MaskError as MaskError  # the page catches it
from radflow.learning.mask_files import check_size, read_mask
from radflow.learning.masks import GroundTruth, load_mask, save_mask
from radflow.learning.segmentation import PROBABILITY_KEY, load_predicted_mask
from radflow.learning.tasks import Task, get_task
from radflow.learning.tasks.base import MASK_PREFIX
from radflow.services.review import clean_comment
from radflow.services.study_view import OverlayUnreadable, PredictionView, StudyNotFound
from radflow.services.users import Permission, Principal, require
from radflow.services.worklist import REVIEW_SOURCE
from radflow.settings import Settings
from radflow.store import ObjectNotFound, ObjectStore

logger = logging.getLogger(__name__)


class MaskVerdict(enum.StrEnum):
    ACCEPT = "accept"
    """The predicted mask (at the model's threshold) is right: it becomes the label."""
    REJECT = "reject"
    """The predicted mask is wrong; no label (upload a corrected mask to give one)."""
    CORRECT = "correct"
    """The uploaded mask becomes the label."""


@dataclass(frozen=True)
class MaskUpload:
    """A file the reviewer gave; ``name`` only names it in messages."""

    name: str
    data: bytes


@dataclass(frozen=True)
class MaskReviewResult:
    study_uid: str
    task: str
    verdict: MaskVerdict
    label_id: int | None
    """The new label (None for a rejection)."""
    foreground: int | None
    """Pixels of the structure in the stored mask."""

    def describe(self) -> str:
        if self.label_id is None:
            return f"Saved: the {self.task} mask is rejected (no label stored)"
        what = "predicted mask" if self.verdict is MaskVerdict.ACCEPT else "corrected mask"
        return f"Saved: the {what} is the {self.task} label ({self.foreground} pixels)"


def predicted_mask(store: ObjectStore, prediction: PredictionView) -> NDArray[np.bool_]:
    """The prediction's mask at its model's threshold: what its DICOM SEG holds.

    Raises OverlayUnreadable when the prediction stored no probability map (or an unreadable
    one) and ObjectNotFound when the map is missing from the store.
    """
    if prediction.mask_key is None:
        raise OverlayUnreadable(f"the prediction of {prediction.model} stored no probability map")
    return _at_threshold(store, prediction.mask_key, prediction.threshold)


def _at_threshold(store: ObjectStore, key: str, threshold: float) -> NDArray[np.bool_]:
    try:
        return load_predicted_mask(store, key, threshold)
    except (ValueError, OSError, EOFError) as exc:
        raise OverlayUnreadable(f"{key} is not a readable probability map: {exc}") from exc


def review_mask(
    session: Session,
    store: ObjectStore,
    settings: Settings,
    principal: Principal,
    study_uid: str,
    task: str,
    verdict: MaskVerdict | str,
    *,
    upload: MaskUpload | None = None,
    confirm_empty: bool = False,
    comment: str | None = None,
) -> MaskReviewResult:
    """Record a reviewer's verdict on the study's mask for segmentation task ``task``.

    ACCEPT and REJECT refer to the study's latest prediction of the task; CORRECT needs
    ``upload``, not a prediction. Raises MaskError (the mask is refused; nothing changed),
    ValueError for a request that makes no sense here, StudyNotFound, PermissionDenied.
    """
    require(principal, Permission.REVIEW)
    verdict = MaskVerdict(verdict)
    segmentation = get_task(task)
    if not segmentation.segmentation:
        raise ValueError(
            f"{segmentation.name} is a {segmentation.kind} task: review it with agree, "
            "disagree or a label, not with a mask"
        )
    study = session.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        raise StudyNotFound(study_uid)
    prediction = _latest_prediction(session, study.id, segmentation.name)
    if verdict is not MaskVerdict.CORRECT and (
        prediction is None or not prediction.derived_keys.get(PROBABILITY_KEY)
    ):
        raise ValueError(
            f"nothing to {verdict.value}: the study has no {segmentation.name} prediction with "
            "a mask; upload a mask instead"
        )
    comment = clean_comment(comment)
    label: Label | None = None
    foreground: int | None = None
    if verdict is not MaskVerdict.REJECT:
        mask = _mask(store, settings, session, study, segmentation, verdict, prediction, upload)
        if not mask.any() and not confirm_empty:
            structure = segmentation.coding.segments[0].label.lower()
            raise MaskError(
                "empty-mask",
                f"the mask has no pixel of {structure}; if the image truly shows none, confirm "
                "that the mask is empty and submit again",
            )
        label = _add_label(session, store, study, segmentation, mask, principal.name, comment)
        foreground = int(mask.sum())
    study.status, study.status_reason = StudyStatus.REVIEWED, None
    session.add(
        record(
            principal.name,
            "review",
            "study",
            study_uid,
            task=segmentation.name,
            verdict=verdict.value,
            label_id=label.id if label else None,
            prediction_id=prediction.id if prediction else None,
            foreground=foreground,
            upload_bytes=len(upload.data) if upload and verdict is MaskVerdict.CORRECT else None,
            commented=comment is not None,
        )
    )
    return MaskReviewResult(
        study_uid, segmentation.name, verdict, label.id if label else None, foreground
    )


def _add_label(
    session: Session,
    store: ObjectStore,
    study: Study,
    task: Task,
    mask: NDArray[np.bool_],
    author: str,
    comment: str | None,
) -> Label:
    """Store ``mask`` as an imported mask is stored, and record it as the study's label."""
    region = _region(session, store, study, task, mask.shape)
    value = save_mask(store, study.study_uid, task.name, GroundTruth(mask, region))
    return add_label(
        session,
        study.study_uid,
        task.name,
        value,
        source=REVIEW_SOURCE,
        author=author,
        comment=comment,
    )


def _latest_prediction(session: Session, study_id: int, task: str) -> Prediction | None:
    return session.scalar(
        select(Prediction)
        .where(Prediction.study_id == study_id, Prediction.task == task)
        .options(selectinload(Prediction.model_version))
        .order_by(Prediction.created_at.desc(), Prediction.id.desc())
        .limit(1)
    )


def _mask(
    store: ObjectStore,
    settings: Settings,
    session: Session,
    study: Study,
    task: Task,
    verdict: MaskVerdict,
    prediction: Prediction | None,
    upload: MaskUpload | None,
) -> NDArray[np.bool_]:
    """The mask to store: the prediction's at its threshold, or the upload, checked against
    the study's image (or volume) for the task."""
    grid = _grid(session, store, settings, study, task)
    if verdict is MaskVerdict.ACCEPT:
        assert prediction is not None  # review_mask checked it
        key = str(prediction.derived_keys[PROBABILITY_KEY])
        mask = _at_threshold(store, key, prediction.model_version.threshold)
        check_size(mask.shape, grid.shape, f"of {task.name}", "predicted mask")
        return mask
    if upload is None:
        raise MaskError("no-file", "choose the mask file to upload (PNG, NIfTI or DICOM SEG)")
    if len(upload.data) > settings.mask_upload_max_bytes:
        raise MaskError(
            "too-large",
            f"{upload.name} is {len(upload.data) / 2**20:.1f} MiB; a mask file may be at most "
            f"{settings.mask_upload_max_bytes / 2**20:.1f} MiB (RADFLOW_MASK_UPLOAD_MAX_BYTES): "
            "give a compressed PNG or .nii.gz",
        )
    return read_mask(upload.name, upload.data, grid.shape, sources=grid.sources, affine=grid.affine)


@dataclass(frozen=True)
class _Grid:
    """What a mask must fit: the image's (rows, columns) or the volume's (slices, rows,
    columns), the headers a SEG is read against, and a volume's affine (an oriented NIfTI)."""

    shape: tuple[int, ...]
    sources: list[Dataset]
    affine: NDArray[np.float64] | None = None


def _grid(
    session: Session, store: ObjectStore, settings: Settings, study: Study, task: Task
) -> _Grid:
    """The image (or series) the task looks at in this study, as scoring and training see it:
    the mask must fit it."""
    if task.takes_series:
        routed = route_studies(
            session, [study.id], task, rules_for(settings), max_voxels=settings.max_volume_voxels
        )[study.id]
    else:
        routed = route_series(
            candidates(session, [study.id]).get(study.id, []), task, rules_for(settings)
        )
    if routed.instance is None:
        raise MaskError(
            "no-image",
            f"this study has no image for {task.name} ({routed.reason}), so no mask can be "
            "checked against it",
        )
    if routed.plan is None:
        image = load_sources(store, [routed.instance.object_key])[0]
        return _Grid((int(image.Rows), int(image.Columns)), [image])
    sources = load_sources(store, [s.object_key for s in routed.plan.slices])
    shape = (routed.plan.depth, int(sources[0].Rows), int(sources[0].Columns))
    return _Grid(shape, sources, routed.plan.affine())


def _region(
    session: Session, store: ObjectStore, study: Study, task: Task, shape: tuple[int, ...]
) -> NDArray[np.bool_] | None:
    """The field of view of the study's latest mask label for the task, if it has one of
    ``shape``: it belongs to the image, not to whoever drew the mask."""
    value = session.scalar(
        select(Label.value)
        .where(
            Label.study_id == study.id,
            Label.task == task.name,
            Label.value.startswith(MASK_PREFIX),
        )
        .order_by(Label.created_at.desc(), Label.id.desc())
        .limit(1)
    )
    if value is None:
        return None
    try:
        region = load_mask(store, study.study_uid, task.name, value).region
    except ObjectNotFound:
        logger.warning("study %s: the mask of label %s is missing", study.study_uid, value)
        return None
    return region if region is not None and region.shape == shape else None
