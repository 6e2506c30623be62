"""The study view: details, series, prediction history and the display pipeline for images."""

from __future__ import annotations

import hashlib
import io
from datetime import timedelta

import numpy as np
import pydicom
import pytest
from factories import add_prediction, dicom_bytes, gradient, make_model_version, make_study
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import StudyStatus, VariantRuntime, unit_of_work
from radflow.services.study_view import StudyNotFound, get_study_view, render_image
from radflow.store import ObjectStore, keys


def test_view_has_study_series_and_newest_prediction_first(
    session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    with unit_of_work(session_factory) as session:
        v1 = make_model_version(session, version=1, threshold=0.5)
        v2 = make_model_version(session, version=2, threshold=0.8)
        study = make_study(session, store, accession="A1", patient="PSN-A", score=0.7, model=v1)
        add_prediction(session, study, v2, 0.75, created_at=study.received_at + timedelta(hours=2))
        study_uid = study.study_uid

    with session_factory() as session:
        view = get_study_view(session, study_uid)

    assert (view.study_uid, view.accession, view.patient, view.modality) == (
        study_uid,
        "A1",
        "PSN-A",
        "CR",
    )
    assert view.status == "scored"
    assert [(p.model, p.score, p.threshold, p.flagged) for p in view.predictions] == [
        ("pneumonia-cxr:v2", pytest.approx(0.75), pytest.approx(0.8), False),
        ("pneumonia-cxr:v1", pytest.approx(0.7), pytest.approx(0.5), True),
    ]
    assert view.latest is view.predictions[0]
    assert view.predictions[0].latency_ms == pytest.approx(12.5)
    assert len(view.series) == 1
    assert view.series[0].instance_count == 1
    assert view.preview_key is not None
    assert view.preview_key.startswith(f"originals/{study_uid}/")


def test_a_score_from_a_compressed_variant_says_so(
    session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    with unit_of_work(session_factory) as session:
        v1, v2 = make_model_version(session, version=1), make_model_version(session, version=2)
        study = make_study(session, store, score=0.4, model=v1)
        add_prediction(
            session,
            study,
            v2,
            0.42,
            created_at=study.received_at + timedelta(hours=1),
            store=store,
            gradcam=True,
            runtime=VariantRuntime.ONNX_INT8,
        )
        study_uid = study.study_uid

    with session_factory() as session:
        latest, earlier = get_study_view(session, study_uid).predictions

    assert (latest.runtime, latest.compressed, earlier.runtime) == ("onnx-int8", True, "torch-fp32")
    assert latest.provenance == (
        "Score from the onnx-int8 variant of pneumonia-cxr:v2, which passed its "
        "non-inferiority check against the PyTorch weights; its heat map from the PyTorch weights."
    )
    assert earlier.provenance is None


def test_unscored_study_has_no_predictions(
    session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    with unit_of_work(session_factory) as session:
        study_uid = make_study(
            session, store, status=StudyStatus.FAILED, status_reason="no pixel data"
        ).study_uid
    with session_factory() as session:
        view = get_study_view(session, study_uid)
    assert view.predictions == []
    assert view.latest is None
    assert (view.status, view.status_reason) == ("failed", "no pixel data")


def test_unknown_study_raises_a_lookup_error_naming_it(
    session_factory: sessionmaker[Session],
) -> None:
    with session_factory() as session, pytest.raises(StudyNotFound, match=r"1\.2\.3\.4"):
        get_study_view(session, "1.2.3.4")
    assert issubclass(StudyNotFound, LookupError)


def put(store: ObjectStore, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    key = keys.original("1.2.3", "1.2.3.4", f"1.2.3.4.{int(digest[:12], 16)}", digest)
    store.put_bytes(key, data)
    return key


def test_render_of_a_stored_study_is_2d_uint8(
    session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    with unit_of_work(session_factory) as session:
        study_uid = make_study(session, store).study_uid
    with session_factory() as session:
        key = get_study_view(session, study_uid).preview_key
    assert key is not None
    image = render_image(store, key)
    assert image.dtype == np.uint8
    assert image.shape == (64, 64)
    # No window in the file: the full range of the gradient maps to black..white.
    assert (image[0, 0], image[0, -1]) == (0, 255)
    assert np.all(np.diff(image[0].astype(int)) >= 0)


def test_explicit_window_clips_below_and_above(store: ObjectStore) -> None:
    key = put(store, dicom_bytes(gradient(high=4095)))
    image = render_image(store, key, window=(2048, 1024))
    column = np.linspace(0, 4095, 64)
    assert np.all(image[:, column < 1536] == 0)
    assert np.all(image[:, column > 2560] == 255)
    middle = image[0, (column > 1600) & (column < 2500)]
    assert np.all((middle > 0) & (middle < 255))
    assert np.all(np.diff(middle.astype(int)) > 0)


def test_window_from_the_file_is_used_by_default(store: ObjectStore) -> None:
    key = put(store, dicom_bytes(gradient(), window=(1000, 200)))
    assert np.array_equal(render_image(store, key), render_image(store, key, window=(1000, 200)))
    assert not np.array_equal(
        render_image(store, key), render_image(store, key, window=(2048, 4096))
    )


def test_first_of_several_file_windows_is_the_default(store: ObjectStore) -> None:
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(gradient())))
    ds.WindowCenter, ds.WindowWidth = [1000, 3000], [200, 500]
    buffer = io.BytesIO()
    ds.save_as(buffer)
    key = put(store, buffer.getvalue())
    assert np.array_equal(render_image(store, key), render_image(store, key, window=(1000, 200)))


def test_voi_lut_from_the_file_is_applied(store: ObjectStore) -> None:
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(gradient(high=4095))))
    lut = Dataset()
    # Both tags have ambiguous VRs (US/SS, US/OW), so name the VR.
    lut.add_new("LUTDescriptor", "US", [4096, 0, 12])
    lut.add_new("LUTData", "US", [4095 - value for value in range(4096)])  # inverting
    ds.VOILUTSequence = [lut]
    buffer = io.BytesIO()
    ds.save_as(buffer)
    image = render_image(store, put(store, buffer.getvalue()))
    assert (image[0, 0], image[0, -1]) == (255, 0)


def test_window_is_in_rescaled_units(store: ObjectStore) -> None:
    # CT-like: stored 0..4095 with slope 1, intercept -1024 -> -1024..3071 HU.
    key = put(store, dicom_bytes(gradient(), rescale=(1.0, -1024.0)))
    image = render_image(store, key, window=(0, 100))  # 0 HU in the middle of the window
    column_hu = np.linspace(0, 4095, 64) - 1024
    assert np.all(image[:, column_hu < -50] == 0)
    assert np.all(image[:, column_hu > 50] == 255)


def test_monochrome1_is_inverted(store: ObjectStore) -> None:
    mono2 = render_image(store, put(store, dicom_bytes(gradient(), photometric="MONOCHROME2")))
    mono1 = render_image(store, put(store, dicom_bytes(gradient(), photometric="MONOCHROME1")))
    assert np.array_equal(mono1, 255 - mono2)
    assert (mono1[0, 0], mono1[0, -1]) == (255, 0)


def test_multiframe_shows_the_middle_frame(store: ObjectStore) -> None:
    frames = np.stack([gradient() * 0 + value for value in (100, 200, 300)]).astype(np.uint16)
    frames[:, :, 0] = 0  # a dark column so the full-range mapping has something to span
    image = render_image(store, put(store, dicom_bytes(frames)), window=(200, 201))
    assert image.shape == (64, 64)
    assert int(image[0, 10]) == 128


def test_window_width_below_one_is_rejected(store: ObjectStore) -> None:
    key = put(store, dicom_bytes(gradient()))
    with pytest.raises(ValueError, match="window width"):
        render_image(store, key, window=(100, 0))
