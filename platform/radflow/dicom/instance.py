"""One received DICOM instance: read tolerantly, validated strictly, summarised for indexing."""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.charset import python_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag, Tag
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


# The elements read_header looks at. pydicom still walks every element header but keeps only
# these (and SpecificCharacterSet, which it always keeps), skipping the other values unread.
# Plain ints: a BaseTag key would make every dict lookup call BaseTag.__eq__ in Python.
_TAGS = {
    keyword: int(Tag(keyword))
    for keyword in (
        "SOPInstanceUID",
        "SOPClassUID",
        "SeriesInstanceUID",
        "StudyInstanceUID",
        "PatientID",
        "AccessionNumber",
        "StudyDate",
        "StudyDescription",
        "SeriesDescription",
        "Modality",
        "BodyPartExamined",
        "SeriesNumber",
        "InstanceNumber",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "ImageType",
        "PixelData",
        "FloatPixelData",
    )
}
# As BaseTags: dcmread passes each through Tag(), which returns a BaseTag at once.
_SPECIFIC_TAGS: list[BaseTag | int] = [BaseTag(tag) for tag in _TAGS.values()]
_SPECIFIC_CHARACTER_SET = int(Tag("SpecificCharacterSet"))
# Values longer than this stay on disk: in practice only pixel data, which is checked for
# presence and length but never loaded. Every element with a 16-bit length (all those above
# but pixel data) is shorter, so none of them is deferred in explicit VR; in implicit VR one
# that were would be read back on demand by pydicom.
_DEFER_BYTES = 64 * 1024


def _read(path: Path) -> Dataset:
    ds = _dcmread(path, _SPECIFIC_TAGS)
    meta = getattr(ds, "file_meta", None) or Dataset()
    if not len(ds) and "TransferSyntaxUID" in meta and not len(_dcmread(path, None)):
        # pydicom drops every element it read when the file ends inside an element of
        # undefined length (a sequence, encapsulated pixel data): only a warning says so.
        raise InvalidInstance(
            "truncated",
            f"{path.name}: no data element could be read; the file ends inside one (cut "
            "short) or holds nothing but file meta information; resend it",
        )
    return ds


def _dcmread(path: Path, specific_tags: list[BaseTag | int] | None) -> Dataset:
    try:
        return pydicom.dcmread(path, defer_size=_DEFER_BYTES, specific_tags=specific_tags)
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
    # strip() is all UID() would add here (besides a validation warning): the set holds UIDs,
    # which compare and hash as str.
    if tsyntax.strip() not in SUPPORTED_TRANSFER_SYNTAXES:
        raise InvalidInstance(
            "unsupported-transfer-syntax",
            f"{path.name}: transfer syntax {tsyntax} is not supported; send it uncompressed or "
            "as JPEG, JPEG-LS, JPEG 2000 or RLE",
        )
    values = _Values(ds)
    uids = {
        name: _uid(values, name, path)
        for name in ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID")
    }
    pixels = values.raw.get(_TAGS["PixelData"]) or values.raw.get(_TAGS["FloatPixelData"])
    if pixels is None:
        raise InvalidInstance("no-pixel-data", f"{path.name}: instance has no pixel data")
    size = path.stat().st_size
    _check_complete(pixels, path, tsyntax, size)
    try:
        rows, columns = values.us("Rows"), values.us("Columns")
        digits = values.digits("NumberOfFrames")
        frames = int(ds.get("NumberOfFrames", 1) or 1) if digits is None else int(digits or 1) or 1
    except (TypeError, ValueError):  # "abc", several values: a sender's bug, not ours
        raise InvalidInstance(
            "bad-dimensions", f"{path.name}: Rows, Columns or NumberOfFrames is not one number"
        ) from None
    if rows <= 0 or columns <= 0:
        raise InvalidInstance("bad-dimensions", f"{path.name}: Rows/Columns missing or zero")
    if rows * columns * frames > max_pixels:
        raise InvalidInstance(
            "too-large",
            f"{path.name}: {rows}x{columns}x{frames} pixels exceeds the limit of {max_pixels} "
            "(RADFLOW_MAX_PIXELS)",
        )
    patient_id = values.ascii("PatientID", "LO")
    return InstanceHeader(
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        series_uid=uids["SeriesInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        transfer_syntax_uid=tsyntax,
        patient_id=str(ds.get("PatientID", "") or "") if patient_id is None else patient_id,
        accession_number=_text(values, "AccessionNumber", "SH", 16),
        study_date=_text(values, "StudyDate", "DA", 8),
        study_description=_text(values, "StudyDescription", "LO", 64),
        series_description=_text(values, "SeriesDescription", "LO", 64),
        modality=_text(values, "Modality", "CS", 16),
        body_part=_text(values, "BodyPartExamined", "CS", 16),
        series_number=_int(values, "SeriesNumber"),
        instance_number=_int(values, "InstanceNumber"),
        rows=rows,
        columns=columns,
        frames=frames,
        size_bytes=size,
        sha256=digest(),
        image_type=_image_type(values),
    )


# Encapsulated pixel data (PS3.5 A.4), always little endian: items, then a sequence delimiter.
_ITEM_HEADER = struct.Struct("<HHL")
_ITEM = (0xFFFE, 0xE000)
_SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)
_UNDEFINED_LENGTH = 0xFFFFFFFF


def _check_complete(
    pixels: DataElement | RawDataElement, path: Path, tsyntax: str, size: int
) -> None:
    """Reject a file cut short in its pixel data (an interrupted copy or transfer).

    pydicom reads such a file without complaint because the pixel data is only decoded later;
    catching it here keeps a half file from being acknowledged and stored as if it were whole.
    ``pixels`` is the element as read, never loaded: only its position and length are needed.
    """
    if tsyntax == "1.2.840.10008.1.2.1.99":
        # Deflated: positions are in the inflated stream, not the file; a cut stream fails to
        # inflate instead (zlib raises while reading).
        return
    tell = getattr(pixels, "value_tell", None)
    length = getattr(pixels, "length", None)
    if tell is None or length is None:
        return
    if length == _UNDEFINED_LENGTH:
        with path.open("rb") as f:
            complete = _encapsulated_end(f, tell, size) is not None
    else:
        complete = tell + length <= size
    if not complete:
        raise InvalidInstance(
            "truncated",
            f"{path.name}: pixel data is cut short or its fragments are malformed ({size} bytes "
            "on disk); resend it",
        )


def _encapsulated_end(f: BinaryIO, start: int, size: int) -> int | None:
    """Where encapsulated pixel data whose value starts at ``start`` ends: the offset after
    its sequence delimiter. None if the file ends first or an item is malformed.

    Walks the item headers (one per fragment), never reading a fragment: elements may follow
    the pixel data (Data Set Trailing Padding), so its end is not the end of the file.
    """
    position = start
    while position + _ITEM_HEADER.size <= size:
        f.seek(position)
        group, element, length = _ITEM_HEADER.unpack(f.read(_ITEM_HEADER.size))
        position += _ITEM_HEADER.size
        if (group, element) == _SEQUENCE_DELIMITER:
            return position
        if (group, element) != _ITEM or length == _UNDEFINED_LENGTH:
            return None
        position += length
    return None


# pydicom turns each value read (ds.get) into a DataElement through its raw-element hooks, VR
# lookup and value validation: ~30 µs apiece, half of read_header's time. For the usual value, a
# single printable-ASCII string in the element's standard VR, that conversion comes down to
# decoding the bytes and dropping trailing NUL/space padding. So _Values reads the raw bytes in
# that case and the callers hand anything else (deferred, another VR, non-ASCII or escape
# sequences, several values, signs...) to pydicom exactly as before.
_PRINTABLE = re.compile(rb"[ -\[\]-~]*")  # printable ASCII but backslash, the value separator
_PRINTABLE_MULTI = re.compile(rb"[ -~]*")
# pydicom decodes these VRs with the SpecificCharacterSet, the others always as ISO-IR 6.
_CHARSET_VRS = frozenset({"SH", "LO"})


class _Values:
    """A dataset's values read from its raw elements where pydicom's conversion is trivial."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        # Deferred elements stay as they are here (value None): never read, only measured.
        self.raw = {int(element.tag): element for element in ds.values()}

    def ascii(self, name: str, vr: str, *, multi: bool = False) -> str | None:
        """The value as pydicom would decode it if that is plain ASCII ("" if absent: callers
        treat both alike), else None: convert it with pydicom."""
        raw = self.raw.get(_TAGS[name])
        if raw is None:
            return ""
        if not isinstance(raw, RawDataElement) or raw.VR not in (vr, None):  # None: implicit
            return None
        value = raw.value
        if not isinstance(value, bytes):
            return None
        value = value.rstrip(b"\0 ")
        if not (_PRINTABLE_MULTI if multi else _PRINTABLE).fullmatch(value):
            return None
        if vr in _CHARSET_VRS and not self.ascii_charset:
            return None
        return value.decode("ascii")

    @cached_property
    def ascii_charset(self) -> bool:
        """Whether printable ASCII decodes to itself in the dataset's SpecificCharacterSet.

        True of every character set DICOM defines (checked in the tests), but pydicom also
        takes any Python codec name there (say "cp037", EBCDIC): then only pydicom decodes right.
        """
        element = self.raw.get(_SPECIFIC_CHARACTER_SET)
        if element is None:
            return True
        value = element.value  # pydicom has usually converted this one already
        if isinstance(value, bytes):
            value = value.rstrip(b"\0 ").decode("latin-1").split("\\")
        terms = [value or ""] if value is None or isinstance(value, str) else list(value)
        return all(term in python_encoding for term in terms)

    def digits(self, name: str) -> str | None:
        """An IS value made of digits only, or "" if empty or absent; else None."""
        value = self.ascii(name, "IS")
        return value if value is not None and (value.isdigit() or not value) else None

    def us(self, name: str) -> int:
        raw = self.raw.get(_TAGS[name])
        if raw is None:
            return 0
        if (
            isinstance(raw, RawDataElement)
            and raw.VR in ("US", None)
            and isinstance(raw.value, bytes)
            and len(raw.value) == 2
        ):
            return int.from_bytes(raw.value, "little" if raw.is_little_endian else "big")
        return int(self.ds.get(name, 0) or 0)


def _uid(values: _Values, name: str, path: Path) -> str:
    value = values.ascii(name, "UI")
    value = (str(values.ds.get(name, "") or "") if value is None else value).strip()
    if not value:
        raise InvalidInstance("missing-uid", f"{path.name}: required {name} is missing")
    try:
        return check_uid(value, name)
    except ValueError as exc:
        raise InvalidInstance("invalid-uid", f"{path.name}: {exc}") from None


def _text(values: _Values, name: str, vr: str, limit: int) -> str | None:
    fast = values.ascii(name, vr)
    if fast is not None:
        return fast.strip()[:limit] or None
    value = values.ds.get(name)
    return str(value).strip()[:limit] or None if value is not None else None


def _int(values: _Values, name: str) -> int | None:
    digits = values.digits(name)
    if digits is not None:
        return int(digits) if digits else None
    try:
        value = values.ds.get(name)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _image_type(values: _Values) -> str | None:
    fast = values.ascii("ImageType", "CS", multi=True)
    if fast is not None:
        parts: list[object] = list(fast.split("\\"))
    else:
        value = values.ds.get("ImageType")
        if value is None or value == "":
            return None
        parts = [value] if isinstance(value, str) else list(value)
    return "\\".join(str(v).strip().upper() for v in parts)[:128] or None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
