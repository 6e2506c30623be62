"""Source images for the SEG and SR tests (a radiograph, a CT series, a multi-frame image), the
dciodvfy validator (dicom3tools), and ingesting such images as a scored study."""

from __future__ import annotations

import datetime as dt
import io
import subprocess
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from factories import dicom_bytes, make_model_version
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import Prediction, Study, unit_of_work
from radflow.dicom.codes import Segment
from radflow.dicom.seg import part10
from radflow.dicom.writer import cxr_dataset
from radflow.ingest.index import ingest_files, mark_stable
from radflow.settings import Settings
from radflow.store import ObjectStore

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
OPHTHALMIC_PHOTOGRAPHY_8_BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
DCIODVFY = "/usr/bin/dciodvfy"
VESSELS = Segment(
    "vessels",
    pydicom.sr.coding.Code("91723000", "SCT", "Anatomical structure"),
    pydicom.sr.coding.Code("59820001", "SCT", "Blood vessel"),
)
LESION = Segment(
    "lesion",
    pydicom.sr.coding.Code("49755003", "SCT", "Morphologically abnormal structure"),
    pydicom.sr.coding.Code("52988006", "SCT", "Lesion"),
)


def reread(ds: Dataset) -> Dataset:
    """``ds`` as a reader sees it after a round trip through a Part 10 file."""
    return pydicom.dcmread(io.BytesIO(part10(ds)))


def radiograph(size: int = 64, *, study_uid: str | None = None) -> Dataset:
    """A complete DX image (writer.cxr_dataset), as read from a file."""
    pixels = (np.arange(size * size).reshape(size, size) % 4000).astype(np.uint16)
    ds = cxr_dataset(
        pixels,
        patient_id="PAT-1",
        patient_name="Test^Patient",
        study_uid=study_uid,
        accession="ACC1",
        patient_birth_date=dt.date(1970, 1, 1),
    )
    return reread(ds)


def ct_series(slices: int = 4, size: int = 32, *, study_uid: str | None = None) -> list[Dataset]:
    """A CT series of single-frame axial slices 2.5 mm apart, 0.7 mm pixels."""
    study_uid = study_uid or generate_uid()
    series_uid, frame_of_reference = generate_uid(), generate_uid()
    return [
        reread(_ct_slice(i, size, study_uid, series_uid, frame_of_reference)) for i in range(slices)
    ]


def _ct_slice(index: int, size: int, study_uid: str, series_uid: str, frame: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Ct^Pat", "PAT-2", "", "O"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study_uid, "20240101", "090000"
    ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "1", "ACC2"
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "CT", series_uid, 1
    ds.SeriesDescription, ds.BodyPartExamined = "ABDOMEN", "ABDOMEN"
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
    ds.Manufacturer, ds.InstanceNumber = "Test", index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [0.0, 0.0, index * 2.5]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 2.5
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.KVP, ds.AcquisitionNumber = -1024, 1, 120, 1
    ds.PixelData = np.zeros((size, size), np.int16).tobytes()
    return ds


def enhanced_ct(slices: int = 3, size: int = 32) -> Dataset:
    """A multi-frame (enhanced) CT: a CT series converted by highdicom's legacy converter."""
    series = ct_series(slices, size)
    image = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=series,
        series_instance_uid=generate_uid(),
        series_number=2,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    return reread(image)


def multiframe_capture(frames: int = 3, size: int = 32) -> Dataset:
    """A multi-frame image without a frame of reference (a capture, a cine)."""
    pixels = np.zeros((frames, size, size), np.uint16)
    return pydicom.dcmread(io.BytesIO(dicom_bytes(pixels)))


def photograph(sop_class: str = VL_PHOTOGRAPHIC, rows: int = 40, columns: int = 50) -> Dataset:
    """An RGB photograph (e.g. of the fundus), as read from a file."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "PAT-3", "Photo^Pat", "XC"
    ds.set_pixel_data(
        np.zeros((rows, columns, 3), np.uint8), photometric_interpretation="RGB", bits_stored=8
    )
    return reread(ds)


def dciodvfy(data: bytes, folder: Path) -> tuple[list[str], list[str]]:
    """dicom3tools' IOD validator on ``data``: its (errors, warnings)."""
    if not Path(DCIODVFY).exists():
        pytest.fail(f"{DCIODVFY} is missing: apt-get install dicom3tools", pytrace=False)
    path = folder / f"{generate_uid()}.dcm"
    path.write_bytes(data)
    result = subprocess.run(
        [DCIODVFY, "-new", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = result.stderr.splitlines()
    return (
        [line for line in lines if line.startswith("Error")],
        [line for line in lines if line.startswith("Warning")],
    )


def ingest(
    datasets: Sequence[Dataset],
    folder: Path,
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
) -> str:
    """Store and index ``datasets`` as received files, mark their study stable; its UID."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        path.write_bytes(part10(ds))
        paths.append(path)
    report = ingest_files(paths, settings=settings, session_factory=session_factory, store=store)
    assert not report.rejected, report.rejected
    study_uid = str(datasets[0].StudyInstanceUID)
    with unit_of_work(session_factory) as session:
        mark_stable(session, [study_uid])
    return study_uid


def score(
    session_factory: sessionmaker[Session],
    study_uid: str,
    score: float,
    *,
    task: str = "pneumonia-cxr",
    version: int = 1,
    threshold: float = 0.5,
    derived: dict[str, str] | None = None,
) -> int:
    """A current prediction of the study, as scoring records it; its id."""
    with unit_of_work(session_factory) as session:
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        model = make_model_version(session, task=task, version=version, threshold=threshold)
        prediction = Prediction(
            study_id=study.id,
            model_version_id=model.id,
            task=task,
            score=score,
            scores={"pneumonia": score},
            derived_keys=derived or {},
            latency_ms=10.0,
        )
        session.add(prediction)
        session.flush()
        return prediction.id
