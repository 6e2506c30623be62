"""Factories for test rows: real, tiny DICOM files in the store plus the rows that index them.

They add to the session and flush (so ids exist) but never commit: the test owns the transaction.
"""

from __future__ import annotations

import hashlib
import io
from datetime import UTC, datetime, timedelta
from itertools import count

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from radflow.db import (
    Instance,
    ModelVariant,
    ModelVersion,
    Patient,
    Prediction,
    Series,
    Study,
    StudyStatus,
    VariantRuntime,
)
from radflow.services.users import Principal, Role, add_user
from radflow.store import ObjectStore, keys

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
BASE_TIME = datetime(2024, 1, 1, 8, 0, tzinfo=UTC)

_sequence = count(1)


def gradient(rows: int = 64, columns: int = 64, high: int = 4095) -> NDArray[np.uint16]:
    """A left-to-right ramp from 0 to ``high``: windowing results are easy to predict on it."""
    ramp = np.linspace(0, high, columns).round().astype(np.uint16)
    return np.tile(ramp, (rows, 1))


def dicom_bytes(
    pixels: NDArray[np.integer] | None = None,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    modality: str = "CR",
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    accession: str = "",
    patient_id: str = "TEST-PATIENT",
) -> bytes:
    """A valid Part 10 file; ``pixels`` (rows, cols) or (frames, rows, cols), default a gradient.

    ``window`` writes WindowCenter/WindowWidth, ``rescale`` writes (slope, intercept).
    """
    arr = gradient() if pixels is None else pixels
    ds = Dataset()
    ds.SOPClassUID = CR_IMAGE_STORAGE if arr.ndim == 2 else SECONDARY_CAPTURE
    ds.SOPInstanceUID = sop_instance_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = "Test^Patient"
    ds.AccessionNumber = accession
    ds.Modality = modality
    ds.StudyDate = "20240101"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.set_pixel_data(
        arr.astype(np.uint16),
        photometric_interpretation=photometric,
        bits_stored=12,
        generate_instance_uid=False,
    )
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def make_model_version(
    session: Session, *, task: str = "pneumonia-cxr", version: int = 1, threshold: float = 0.5
) -> ModelVersion:
    """The (task, version) model, created on first use."""
    found = session.scalar(
        select(ModelVersion).where(ModelVersion.task == task, ModelVersion.version == version)
    )
    if found is not None:
        return found
    model = ModelVersion(
        task=task,
        version=version,
        threshold=threshold,
        weights_key=keys.model(task, version, "weights.pt"),
        code_version="test",
    )
    session.add(model)
    session.flush()
    return model


def add_variant(
    session: Session,
    model: ModelVersion,
    runtime: VariantRuntime | str,
    *,
    passed: bool = True,
    auc_delta: float = 0.0,
    images_per_second: float = 1000.0,
) -> ModelVariant:
    """A judged runtime variant row (no file behind it: for pages, services and the registry)."""
    runtime = VariantRuntime(runtime)
    variant = ModelVariant(
        model_version_id=model.id,
        runtime=runtime,
        object_key=keys.model(model.task, model.version, f"{runtime.value}.onnx"),
        size_bytes=400_000 if runtime == VariantRuntime.ONNX_INT8 else 1_600_000,
        metrics={
            "auc": 0.95 + auc_delta,
            "auc_delta": auc_delta,
            "images_per_second": images_per_second,
        },
        passed=passed,
        reason=("passed" if passed else "refused") + ": test verdict",
    )
    session.add(variant)
    session.flush()
    return variant


def heatmap_png(rows: int = 28, columns: int = 28) -> bytes:
    """A Grad-CAM-like heat map: a greyscale PNG, hot in the upper-left quadrant."""
    y, x = np.mgrid[0:rows, 0:columns]
    heat = np.exp(
        -(((y - rows * 0.3) / (rows * 0.2)) ** 2 + ((x - columns * 0.3) / (columns * 0.2)) ** 2)
    )
    buffer = io.BytesIO()
    Image.fromarray(np.rint(heat * 255).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def add_prediction(
    session: Session,
    study: Study,
    model: ModelVersion,
    score: float,
    *,
    created_at: datetime | None = None,
    store: ObjectStore | None = None,
    gradcam: bool = False,
    runtime: VariantRuntime = VariantRuntime.TORCH_FP32,
    probability: NDArray[np.floating] | None = None,
) -> Prediction:
    """A prediction; with ``gradcam`` (and ``store``) also its heat map PNG in the store, with
    ``probability`` a segmentation's probability map (float16 .npy, as scoring stores it)."""
    derived: dict[str, str] = {}
    if (gradcam or probability is not None) and store is None:
        raise ValueError("gradcam and probability need the store to write to")
    if gradcam and store is not None:
        derived["gradcam"] = keys.derived(study.study_uid, model.task, model.version, "gradcam.png")
        store.put_bytes(derived["gradcam"], heatmap_png(), content_type="image/png")
    if probability is not None and store is not None:
        key = keys.derived(study.study_uid, model.task, model.version, "probability.npy")
        buffer = io.BytesIO()
        np.save(buffer, probability.astype(np.float16))
        store.put_bytes(key, buffer.getvalue())
        derived["probability"] = key
    prediction = Prediction(
        study_id=study.id,
        model_version_id=model.id,
        task=model.task,
        score=score,
        scores={"pneumonia": score} if probability is None else {},
        derived_keys=derived,
        latency_ms=12.5,
        created_at=created_at or study.received_at + timedelta(minutes=1),
        runtime=runtime,
    )
    session.add(prediction)
    session.flush()
    return prediction


def make_study(
    session: Session,
    store: ObjectStore,
    *,
    score: float | None = None,
    status: StudyStatus | None = None,
    status_reason: str | None = None,
    accession: str | None = None,
    patient: str | None = None,
    modality: str = "CR",
    received_at: datetime | None = None,
    model: ModelVersion | None = None,
    pixels: NDArray[np.integer] | None = None,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    gradcam: bool = False,
) -> Study:
    """A study with one series of one stored instance; scored by ``model`` if ``score`` is set.

    Status defaults to SCORED with a score and STABLE without one. Received times default to
    one minute apart in creation order, so "newest first" is predictable.
    """
    n = next(_sequence)
    study_uid, series_uid, sop_uid = generate_uid(), generate_uid(), generate_uid()
    accession = accession if accession is not None else f"ACC{n:05d}"
    data = dicom_bytes(
        pixels,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_instance_uid=sop_uid,
        modality=modality,
        photometric=photometric,
        window=window,
        rescale=rescale,
        accession=accession,
    )
    object_key = keys.original(study_uid, series_uid, sop_uid, hashlib.sha256(data).hexdigest())
    store.put_bytes(object_key, data, content_type="application/dicom")

    study = Study(
        study_uid=study_uid,
        patient=_patient(session, patient or f"PSN{n:05d}"),
        accession_number=accession,
        study_date="20240101",
        modality=modality,
        status=status or (StudyStatus.SCORED if score is not None else StudyStatus.STABLE),
        status_reason=status_reason,
        received_at=received_at or BASE_TIME + timedelta(minutes=n),
    )
    frames = 1 if pixels is None or pixels.ndim == 2 else pixels.shape[0]
    rows, columns = (64, 64) if pixels is None else pixels.shape[-2:]
    series = Series(series_uid=series_uid, modality=modality, number=1, description="test series")
    series.instances.append(
        Instance(
            sop_instance_uid=sop_uid,
            sop_class_uid=CR_IMAGE_STORAGE if frames == 1 else SECONDARY_CAPTURE,
            number=1,
            object_key=object_key,
            size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            rows=rows,
            columns=columns,
            frames=frames,
        )
    )
    study.series.append(series)
    session.add(study)
    session.flush()
    if score is not None:
        model = model or make_model_version(session)
        add_prediction(session, study, model, score, store=store, gradcam=gradcam)
    return study


SEGMENTATION_TASK = "retina-vessels"


def mask_png(mask: NDArray[np.bool_]) -> bytes:
    """A mask as a reviewer draws one: black background, the structure white."""
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    return buffer.getvalue()


def make_segmentation_study(
    session: Session,
    store: ObjectStore,
    probability: NDArray[np.floating] | None,
    *,
    accession: str | None = None,
    threshold: float = 0.5,
) -> Study:
    """A colour-photograph-like study (modality XC, routed to retina-vessels) whose image is as
    large as ``probability`` (rows, columns), scored with that probability map if given."""
    rows, columns = probability.shape if probability is not None else (64, 80)
    study = make_study(
        session, store, modality="XC", pixels=gradient(rows, columns), accession=accession
    )
    if probability is not None:
        model = make_model_version(session, task=SEGMENTATION_TASK, threshold=threshold)
        score = float(probability.max())
        add_prediction(session, study, model, score, store=store, probability=probability)
        study.status = StudyStatus.SCORED
    return study


def _patient(session: Session, pseudonym: str) -> Patient:
    found = session.scalar(select(Patient).where(Patient.pseudonym == pseudonym))
    return found or Patient(pseudonym=pseudonym)


PASSWORD = "correct horse battery"
"""Every factory-made user's password."""
FACTORY_ACTOR = Principal("factory", Role.ADMIN)


def make_user(session: Session, name: str, role: Role | str = Role.RADIOLOGIST) -> Principal:
    """A dashboard user with the password ``PASSWORD``."""
    user = add_user(session, name, role, PASSWORD, actor=FACTORY_ACTOR)
    return Principal(user.name, Role(user.role))
