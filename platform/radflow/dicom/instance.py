"""One received DICOM instance: read tolerantly, validated strictly, summarised for indexing."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from radflow.errors import InvalidInstance
from radflow.store.keys import check_uid

# Transfer syntaxes whose pixel data pydicom can decode with the plugins Radflow installs.
SUPPORTED_TRANSFER_SYNTAXES = frozenset(
    UID(u)
    for u in (
        "1.2.840.10008.1.2",  # Implicit VR Little Endian
        "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
        "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
        "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline
        "1.2.840.10008.1.2.4.51",  # JPEG Extended
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.5",  # RLE Lossless
    )
)


@dataclass(frozen=True)
class InstanceHeader:
    """What the index needs from an instance, read once at ingest."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax_uid: str
    patient_id: str
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    series_description: str | None
    modality: str | None
    body_part: str | None
    series_number: int | None
    instance_number: int | None
    rows: int
    columns: int
    frames: int
    size_bytes: int
    sha256: str
    image_type: str | None = None  # ImageType values joined by "\\", for routing rules


def read_header(
    path: Path, max_pixels: int, *, digest: Callable[[], str] | None = None
) -> InstanceHeader:
    """Read and validate ``path``; raise InvalidInstance with a specific reason if unusable.

    ``digest`` returns the file's SHA-256 when it is computed elsewhere (the receiver hashes in
    a worker thread while this parses); by default the file is hashed here.
    """
    ds = _read(path)
    return header_from_dataset(ds, path, max_pixels, digest or (lambda: file_sha256(path)))


def _read(path: Path) -> Dataset:
    try:
        # Pixel data is not decoded here, only checked for presence; deferring large elements
        # keeps memory flat for big multi-frame files.
        return pydicom.dcmread(path, defer_size="1 MB")
    except InvalidDicomError:
        raise InvalidInstance(
            "not-dicom", f"{path.name}: not a DICOM file (no DICM preamble or readable header)"
        ) from None
    except (EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInstance(
            "unreadable", f"{path.name}: truncated or corrupt DICOM ({exc})"
        ) from None


def header_from_dataset(
    ds: Dataset, path: Path, max_pixels: int, digest: Callable[[], str]
) -> InstanceHeader:
    meta = getattr(ds, "file_meta", None)
    tsyntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    if not tsyntax:
        raise InvalidInstance(
            "unreadable", f"{path.name}: no TransferSyntaxUID in the file meta (truncated header?)"
        )
    if UID(tsyntax) not in SUPPORTED_TRANSFER_SYNTAXES:
        raise InvalidInstance(
            "unsupported-transfer-syntax",
            f"{path.name}: transfer syntax {tsyntax} is not supported; send it uncompressed or "
            "as JPEG, JPEG-LS, JPEG 2000 or RLE",
        )
    uids = {
        name: _uid(ds, name, path)
        for name in ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID")
    }
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise InvalidInstance("no-pixel-data", f"{path.name}: instance has no pixel data")
    _check_complete(ds, path)
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows <= 0 or columns <= 0:
        raise InvalidInstance("bad-dimensions", f"{path.name}: Rows/Columns missing or zero")
    if rows * columns * frames > max_pixels:
        raise InvalidInstance(
            "too-large",
            f"{path.name}: {rows}x{columns}x{frames} pixels exceeds the limit of {max_pixels} "
            "(RADFLOW_MAX_PIXELS)",
        )
    return InstanceHeader(
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        series_uid=uids["SeriesInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        transfer_syntax_uid=tsyntax,
        patient_id=str(ds.get("PatientID", "") or ""),
        accession_number=_text(ds, "AccessionNumber", 16),
        study_date=_text(ds, "StudyDate", 8),
        study_description=_text(ds, "StudyDescription", 64),
        series_description=_text(ds, "SeriesDescription", 64),
        modality=_text(ds, "Modality", 16),
        body_part=_text(ds, "BodyPartExamined", 16),
        series_number=_int(ds, "SeriesNumber"),
        instance_number=_int(ds, "InstanceNumber"),
        rows=rows,
        columns=columns,
        frames=frames,
        size_bytes=path.stat().st_size,
        sha256=digest(),
        image_type=_image_type(ds),
    )


_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_UNDEFINED_LENGTH = 0xFFFFFFFF


def _check_complete(ds: Dataset, path: Path) -> None:
    """Reject a file cut short in its pixel data (an interrupted copy or transfer).

    pydicom reads such a file without complaint because the pixel data is only decoded later;
    catching it here keeps a half file from being acknowledged and stored as if it were whole.
    """
    meta = getattr(ds, "file_meta", None)
    if str(getattr(meta, "TransferSyntaxUID", "")) == "1.2.840.10008.1.2.1.99":
        # Deflated: positions are in the inflated stream, not the file; a cut stream fails to
        # inflate instead (zlib raises while reading).
        return
    element = ds.get_item("PixelData") or ds.get_item("FloatPixelData")
    size = path.stat().st_size
    tell = getattr(element, "value_tell", None)
    length = getattr(element, "length", None)
    if tell is None or length is None:
        return
    if length == _UNDEFINED_LENGTH:
        with path.open("rb") as f:
            f.seek(max(size - 8, 0))
            complete = f.read(8) == _SEQUENCE_DELIMITER
    else:
        complete = tell + length <= size
    if not complete:
        raise InvalidInstance(
            "truncated", f"{path.name}: pixel data is cut short ({size} bytes on disk); resend it"
        )


def _uid(ds: Dataset, name: str, path: Path) -> str:
    value = str(ds.get(name, "") or "").strip()
    if not value:
        raise InvalidInstance("missing-uid", f"{path.name}: required {name} is missing")
    try:
        return check_uid(value, name)
    except ValueError as exc:
        raise InvalidInstance("invalid-uid", f"{path.name}: {exc}") from None


def _text(ds: Dataset, name: str, limit: int) -> str | None:
    value = ds.get(name)
    return str(value).strip()[:limit] or None if value is not None else None


def _int(ds: Dataset, name: str) -> int | None:
    try:
        value = ds.get(name)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _image_type(ds: Dataset) -> str | None:
    value = ds.get("ImageType")
    if value is None or value == "":
        return None
    values = [value] if isinstance(value, str) else list(value)
    return "\\".join(str(v).strip().upper() for v in values)[:128] or None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
