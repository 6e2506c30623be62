"""New DICOM instances written from pixel arrays: imported datasets and generated studies.

Strict writing (pydicom style): a dataset built here is complete for its IOD, with file meta
information, and can be written with ``dcmwrite(..., enforce_file_format=True)``.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
"""Digital X-Ray Image Storage - For Presentation."""

MANUFACTURER = "Radflow"

# A typical flat-panel chest detector: 0.139 mm pixels over a 3072-pixel, 427 mm wide field.
# Smaller images cover the same field, so their pixels are proportionally larger.
_DETECTOR_PIXEL_MM = 0.139
_DETECTOR_PIXELS = 3072

MAX_DX_VALUE = 4095  # 12 bits stored

_CHEST_CODE = ("51185008", "SCT", "Chest")
_PA_VIEW_CODE = ("399348003", "SCT", "postero-anterior")


def _code_item(value: str, scheme: str, meaning: str) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def cxr_dataset(
    pixels: np.ndarray,
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str | None = None,
    accession: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    patient_birth_date: dt.date | None = None,
    patient_sex: str = "O",
    study_datetime: dt.datetime | None = None,
    study_id: str = "1",
    series_number: int = 1,
    instance_number: int = 1,
    institution: str = "Radflow Demo Hospital",
    manufacturer: str = MANUFACTURER,
    model_name: str = "Radflow",
) -> pydicom.Dataset:
    """A complete DX Image (For Presentation) file dataset around 12-bit chest pixels.

    Missing UIDs are generated; pass them in for deterministic output. The result has file meta
    (Explicit VR Little Endian) and can be written with ``dcmwrite(..., enforce_file_format=True)``.
    """
    if pixels.ndim != 2:
        raise ValueError(f"pixels must be a 2-D image, got shape {pixels.shape}")
    if pixels.dtype != np.uint16:
        raise ValueError(f"pixels must be uint16, got {pixels.dtype}; use chest_phantom()")
    if pixels.size and int(pixels.max()) > MAX_DX_VALUE:
        raise ValueError(f"pixels must fit in 12 bits (0..{MAX_DX_VALUE}), max is {pixels.max()}")
    if patient_sex not in ("M", "F", "O"):
        raise ValueError(f"patient_sex must be 'M', 'F' or 'O', got {patient_sex!r}")
    if not patient_id:
        raise ValueError("patient_id must not be empty")

    rows, cols = pixels.shape
    when = study_datetime or dt.datetime(2024, 1, 1, 9, 0, 0)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    sop_instance_uid = sop_instance_uid or generate_uid()
    date = when.strftime("%Y%m%d")
    time = when.strftime("%H%M%S")
    spacing = _DETECTOR_PIXEL_MM * _DETECTOR_PIXELS / max(rows, cols)
    spacing_str = f"{spacing:.4f}"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "RADFLOW_SYN_1"

    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_instance_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time

    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = patient_birth_date.strftime("%Y%m%d") if patient_birth_date else ""
    ds.PatientSex = patient_sex
    if patient_birth_date is not None:
        age = when.year - patient_birth_date.year
        if (when.month, when.day) < (patient_birth_date.month, patient_birth_date.day):
            age -= 1
        ds.PatientAge = f"{max(age, 0):03d}Y"

    # Study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = date
    ds.StudyTime = time
    ds.AccessionNumber = accession or ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = study_id
    ds.StudyDescription = "XR CHEST PA"

    # Series
    ds.Modality = "DX"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.SeriesDescription = "CHEST PA"
    ds.BodyPartExamined = "CHEST"
    ds.PresentationIntentType = "FOR PRESENTATION"

    # Equipment
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model_name
    ds.InstitutionName = institution
    ds.StationName = "SYNXR01"
    ds.SoftwareVersions = "radflow-synthetic 1"
    ds.DeviceSerialNumber = "SYN-0001"

    # Image
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ["L", "F"]
    ds.ContentDate = date
    ds.ContentTime = time
    ds.AcquisitionDate = date
    ds.AcquisitionTime = time
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"

    # Acquisition: plausible adult PA chest technique.
    ds.KVP = 120
    ds.ExposureTime = 8
    ds.XRayTubeCurrent = 320
    ds.Exposure = 3
    ds.DistanceSourceToDetector = 1800
    ds.ViewPosition = "PA"
    ds.PositionerType = "COLUMN"
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = DicomSequence([_code_item(*_CHEST_CODE)])
    ds.ViewCodeSequence = DicomSequence([_code_item(*_PA_VIEW_CODE)])
    ds.AcquisitionContextSequence = DicomSequence([])

    # Detector
    ds.DetectorType = "SCINTILLATOR"
    ds.ImagerPixelSpacing = [spacing_str, spacing_str]
    ds.PixelSpacing = [spacing_str, spacing_str]

    # Pixels
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    # Higher values mean less beam reached the detector (denser tissue), hence -1.
    ds.PixelIntensityRelationshipSign = -1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    low, high = display_window(pixels)
    ds.WindowCenter = f"{(low + high) / 2:.1f}"
    ds.WindowWidth = f"{max(high - low, 1.0):.1f}"
    ds.WindowCenterWidthExplanation = "SYNTHETIC CHEST"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    return ds


def display_window(pixels: np.ndarray) -> tuple[float, float]:
    """A display window from the pixel percentiles, as DX processing software would set it."""
    if pixels.size == 0:
        return 0.0, float(MAX_DX_VALUE)
    low, high = np.percentile(pixels, (1.0, 99.5))
    return float(low), float(high + 0.05 * (high - low))


CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
"""CT Image Storage: one slice per instance, as scanners send a series."""

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
"""Image Orientation (Patient) of an axial slice: rows run to the patient's left, columns back."""

CT_HU_RANGE = (-1024, 3071)
"""Hounsfield units a slice can hold: 12 bits stored, Rescale Intercept -1024."""

ABDOMEN_WINDOW = (40.0, 400.0)
"""The abdominal soft-tissue window (center, width in HU): fat dark, glands and masses bright."""


def window_range(window: tuple[float, float]) -> tuple[float, float]:
    """A (center, width) window as the (lowest, highest) value it shows."""
    center, width = window
    return center - width / 2, center + width / 2


def _ds(value: float) -> str:
    """A DS value (at most 16 characters) for a coordinate in mm."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text[:16]


class CTSeriesBuilder:
    """The single-frame CT Image instances of one volume, slice after slice (CT Image IOD).

    The header is built once per series; a slice changes only its UID, number, position and
    pixels, so a 28-slice series costs little more than its pixels. :meth:`slice` returns the
    same dataset object every time: write it before asking for the next slice.

    Geometry: slice ``i`` lies at ``origin + i * spacing[0] * normal``, where ``normal`` is the
    cross product of the orientation's row and column directions; ``spacing`` is (between
    slices, between rows, between columns) in mm.
    """

    def __init__(
        self,
        *,
        rows: int,
        columns: int,
        spacing: tuple[float, float, float],
        patient_id: str,
        patient_name: str,
        study_uid: str,
        series_uid: str,
        orientation: tuple[float, ...] = AXIAL,
        origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
        study_datetime: dt.datetime | None = None,
        accession: str = "",
        study_id: str = "1",
        series_number: int = 1,
        study_description: str = "CT ABDOMEN",
        series_description: str = "AXIAL",
        body_part: str = "ABDOMEN",
        window: tuple[float, float] = ABDOMEN_WINDOW,
        patient_sex: str = "O",
        institution: str = "Radflow Demo Hospital",
        manufacturer: str = MANUFACTURER,
        model_name: str = "Radflow",
    ) -> None:
        if not patient_id:
            raise ValueError("patient_id must not be empty")
        if len(orientation) != 6:
            raise ValueError(f"orientation needs 6 direction cosines, got {len(orientation)}")
        if min(spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {spacing}")
        row_direction, column_direction = np.array(orientation[:3]), np.array(orientation[3:])
        self.normal = np.cross(row_direction, column_direction)
        self.origin, self.spacing = np.array(origin, dtype=np.float64), spacing
        self.rows, self.columns = rows, columns
        when = study_datetime or dt.datetime(2024, 1, 1, 9, 0, 0)
        date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "RADFLOW_SYN_1"
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        # Patient, study, series, equipment
        ds.PatientName, ds.PatientID = patient_name, patient_id
        ds.PatientBirthDate, ds.PatientSex = "", patient_sex
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study_uid, date, time
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = accession, "", study_id
        ds.StudyDescription = study_description
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "CT", series_uid, series_number
        ds.SeriesDate, ds.SeriesTime = date, time
        ds.SeriesDescription, ds.BodyPartExamined = series_description, body_part
        ds.PatientPosition = "FFS"
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=["radflow-ct-frame", series_uid])
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer, ds.ManufacturerModelName = manufacturer, model_name
        ds.InstitutionName, ds.SoftwareVersions = institution, "radflow 1"
        # Image, CT image
        ds.ContentDate, ds.ContentTime = date, time
        ds.AcquisitionDate, ds.AcquisitionTime = date, time
        ds.AcquisitionNumber = 1
        ds.ImageOrientationPatient = [_ds(v) for v in orientation]
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[2])]
        ds.SliceThickness = _ds(spacing[0])
        ds.KVP = 120
        ds.BurnedInAnnotation, ds.LossyImageCompression = "NO", "00"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, columns
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = CT_HU_RANGE[0], 1, "HU"
        ds.WindowCenter, ds.WindowWidth = _ds(window[0]), _ds(window[1])
        self.dataset = ds

    def position(self, index: int) -> tuple[float, float, float]:
        """Image Position (Patient) of slice ``index`` (mm)."""
        x, y, z = self.origin + index * self.spacing[0] * self.normal
        return float(x), float(y), float(z)

    def slice(
        self,
        index: int,
        hu: np.ndarray,
        *,
        sop_instance_uid: str,
        instance_number: int | None = None,
    ) -> pydicom.Dataset:
        """Slice ``index`` of the volume, ``hu`` (rows x columns, Hounsfield units, rounded and
        clipped to :data:`CT_HU_RANGE`)."""
        if hu.shape != (self.rows, self.columns):
            raise ValueError(f"a slice must be {self.rows}x{self.columns}, got {hu.shape}")
        ds = self.dataset
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
        ds.InstanceNumber = index + 1 if instance_number is None else instance_number
        position = self.position(index)
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.SliceLocation = _ds(float(np.dot(position, self.normal)))
        stored = np.clip(np.rint(hu), *CT_HU_RANGE) - CT_HU_RANGE[0]
        ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
        return ds


VL_PHOTOGRAPHIC_IMAGE = UID("1.2.840.10008.5.1.4.1.1.77.1.4")
"""VL Photographic Image Storage. Chosen over Ophthalmic Photography 8 Bit (a multi-frame IOD)
because highdicom (0.28) builds a SEG over a multi-frame source only from its shared functional
groups, which an OP image does not have."""

_RETINA_CODE = ("5665001", "SCT", "Retina")


def photograph_dataset(
    pixels: np.ndarray,
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    series_uid: str,
    sop_instance_uid: str,
    study_datetime: dt.datetime,
    institution: str = "Radflow dataset import",
) -> pydicom.Dataset:
    """A VL Photographic Image (modality XC) of the retina around RGB fundus pixels.

    ``pixels``: (rows, cols, 3) uint8. A photograph has no pixel spacing the file could vouch
    for, so none is written (areas are then reported in pixels).
    """
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(
            f"pixels must be (rows, cols, 3) uint8 RGB, got {pixels.shape} {pixels.dtype}"
        )
    if not patient_id:
        raise ValueError("patient_id must not be empty")
    date, time = study_datetime.strftime("%Y%m%d"), study_datetime.strftime("%H%M%S")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = VL_PHOTOGRAPHIC_IMAGE
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "RADFLOW_XC_1"

    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = VL_PHOTOGRAPHIC_IMAGE
    ds.SOPInstanceUID = sop_instance_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study_uid, date, time
    ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
    ds.StudyDescription = "FUNDUS PHOTOGRAPHY"
    ds.Modality = "XC"
    ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, 1
    ds.SeriesDescription = "COLOUR FUNDUS"
    ds.Manufacturer, ds.InstitutionName = MANUFACTURER, institution
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDateTime = f"{date}{time}"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = DicomSequence([_code_item(*_RETINA_CODE)])
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds
