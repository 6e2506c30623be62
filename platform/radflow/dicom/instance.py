"""One received DICOM instance: read tolerantly, validated strictly, summarised for indexing.

:func:`read_header` raises nothing but :class:`~radflow.errors.InvalidInstance` whatever the
file holds (OSError from the file system aside), with the most specific reason it can prove from
the header alone, and in bounded memory and time: the structure is walked by
:mod:`radflow.dicom.elements` (no recursion, pixel data skipped unread, deflated data inflated as
a stream); this module checks what the values say against each other and against the pixel data
element. Pixel data is never decoded here: what cannot be proved without decoding is left to
whatever decodes it.

The integers in an :class:`InstanceHeader` fit the index's 32-bit INTEGER columns: a Series or
Instance Number that is not a number or lies outside that range (senders have sent 20-digit
ones) becomes None and is listed in ``InstanceHeader.unusable``; the image itself is kept.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

from radflow.dicom import as_text
from radflow.dicom.elements import PixelData, read_meta, walk
from radflow.errors import PIXEL_DATA_MISMATCH, InvalidInstance
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
# The others carry their pixel data in fragments (PS3.5 A.4).
_NATIVE_TRANSFER_SYNTAXES = frozenset(
    s for s in SUPPORTED_TRANSFER_SYNTAXES if not s.is_encapsulated
)

_INT32 = range(-(2**31), 2**31)


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
    # Where a single-frame image lies in the patient (mm, LPS), for assembling a series into a
    # volume from the index alone (radflow.dicom.geometry); None when absent or not numbers.
    # A multi-frame instance keeps these per frame in its functional groups, read on loading.
    image_position: tuple[float, ...] | None = None  # ImagePositionPatient (x, y, z)
    image_orientation: tuple[float, ...] | None = None  # ImageOrientationPatient (6 cosines)
    pixel_spacing: tuple[float, ...] | None = None  # PixelSpacing (row, column spacing)
    temporal_position: int | None = None  # TemporalPositionIndex: the order of a time series
    # Keywords of values the file has but the header drops (None above): not one integer, or
    # outside the 32-bit range the index stores.
    unusable: tuple[str, ...] = ()


def read_header(
    path: Path, max_pixels: int, *, digest: Callable[[], str] | None = None
) -> InstanceHeader:
    """Read and validate ``path``; raise InvalidInstance with a specific reason if unusable.

    ``digest`` returns the file's SHA-256 when it is computed elsewhere (the receiver hashes in
    a worker thread while this parses); by default the file is hashed here.
    """
    name = path.name
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        meta = read_meta(f, size, name)
        tsyntax = _transfer_syntax(meta.transfer_syntax, name)
        if meta.body_start is None:
            raise InvalidInstance(
                "truncated", f"{name}: the file ends inside its file meta information; resend it"
            )
        image = _Image(name, tsyntax, max_pixels)
        walked = walk(
            f,
            size,
            name,
            start=meta.body_start,
            transfer_syntax=tsyntax,
            wanted=_WANTED,
            pixel_allowance=image.allowance,
        )
    values = _Values(walked.elements)
    uids = {
        keyword: _uid(values, keyword, name)
        for keyword in ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID")
    }
    if walked.pixels is None:
        raise InvalidInstance("no-pixel-data", f"{name}: instance has no pixel data")
    image.check_fragments(walked.pixels)
    unusable: list[str] = []
    patient_id = values.ascii("PatientID", "LO")
    return InstanceHeader(
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        series_uid=uids["SeriesInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        transfer_syntax_uid=tsyntax,
        patient_id=values.text("PatientID") if patient_id is None else patient_id,
        accession_number=_text(values, "AccessionNumber", "SH", 16),
        study_date=_text(values, "StudyDate", "DA", 8),
        study_description=_text(values, "StudyDescription", "LO", 64),
        series_description=_text(values, "SeriesDescription", "LO", 64),
        modality=_text(values, "Modality", "CS", 16),
        body_part=_text(values, "BodyPartExamined", "CS", 16),
        series_number=_int32(walked.elements, "SeriesNumber", unusable),
        instance_number=_int32(walked.elements, "InstanceNumber", unusable),
        rows=image.rows,
        columns=image.columns,
        frames=image.frames,
        size_bytes=size,
        sha256=(digest or (lambda: file_sha256(path)))(),
        image_type=_image_type(values),
        image_position=_numbers(values, "ImagePositionPatient", 3),
        image_orientation=_numbers(values, "ImageOrientationPatient", 6),
        pixel_spacing=_numbers(values, "PixelSpacing", 2, positive=True),
        temporal_position=_int32(walked.elements, "TemporalPositionIndex", unusable),
        unusable=tuple(unusable),
    )


# The elements read_header reads (the walk skips every other value unread; pydicom's
# SpecificCharacterSet is read too, for text). Plain ints: a BaseTag key would make every dict
# lookup call BaseTag.__eq__ in Python.
_TAGS = {
    keyword: int(Tag(keyword))
    for keyword in (
        "SpecificCharacterSet",
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
        "ImageType",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "NumberOfFrames",
        "Rows",
        "Columns",
        "BitsAllocated",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "TemporalPositionIndex",
    )
}
_WANTED = frozenset(_TAGS.values())
_SPECIFIC_CHARACTER_SET = _TAGS["SpecificCharacterSet"]


def _transfer_syntax(value: str | None, name: str) -> str:
    if not value:
        raise InvalidInstance(
            "unreadable",
            f"{name}: no TransferSyntaxUID in the file meta (cut short or corrupt header?)",
        )
    # The set holds UIDs, which compare and hash as str.
    if value not in SUPPORTED_TRANSFER_SYNTAXES:
        raise InvalidInstance(
            "unsupported-transfer-syntax",
            f"{name}: transfer syntax {value[:80]} is not supported; send it uncompressed or "
            "as JPEG, JPEG-LS, JPEG 2000 or RLE",
        )
    return value


# BitsAllocated each pixel data element may have (PS3.3 C.7.6.3.1, C.7.6.24).
_BITS_ALLOCATED = {
    0x7FE00010: (1, 8, 16, 32, 64),  # Pixel Data
    0x7FE00008: (32,),  # Float Pixel Data
    0x7FE00009: (64,),  # Double Float Pixel Data
}


class _Image:
    """The image the header describes, checked against the pixel data element as the walk
    reaches it: before a deflated data set inflates its pixel data, and without reading any."""

    def __init__(self, name: str, tsyntax: str, max_pixels: int) -> None:
        self.name, self.tsyntax, self.max_pixels = name, tsyntax, max_pixels
        self.rows = self.columns = self.frames = 0

    def refuse(self, reason: str, detail: str) -> InvalidInstance:
        return InvalidInstance(reason, f"{self.name}: {detail}")

    def allowance(self, elements: dict[BaseTag, RawDataElement], pixels: PixelData) -> int:
        """Check the header's image against ``pixels``; the bytes its value may take."""
        if self.rows:
            raise self.refuse(PIXEL_DATA_MISMATCH, "more than one pixel data element")
        rows, columns = _us(elements, "Rows", self.name), _us(elements, "Columns", self.name)
        if not rows or not columns:
            raise self.refuse("bad-dimensions", "Rows/Columns missing or zero")
        frames = _frames(elements, self.name)
        if frames not in _INT32 or rows * columns * frames > self.max_pixels:
            raise self.refuse(
                "too-large",
                f"{rows}x{columns}x{frames} pixels exceeds the limit of {self.max_pixels} "
                "(RADFLOW_MAX_PIXELS)",
            )
        samples = _us(elements, "SamplesPerPixel", self.name)
        if samples not in (1, 3):
            raise self.refuse("bad-dimensions", f"SamplesPerPixel is {_shown(samples)}, not 1 or 3")
        bits = _us(elements, "BitsAllocated", self.name)
        if bits not in _BITS_ALLOCATED[pixels.tag]:
            raise self.refuse(
                "bad-dimensions",
                f"BitsAllocated is {_shown(bits)}; ({pixels.tag >> 16:04X},"
                f"{pixels.tag & 0xFFFF:04X}) needs one of {_BITS_ALLOCATED[pixels.tag]}",
            )
        self.rows, self.columns, self.frames = rows, columns, frames
        if self.tsyntax not in _NATIVE_TRANSFER_SYNTAXES:
            if pixels.tag != 0x7FE00010 or pixels.length is not None:
                raise self.refuse(
                    PIXEL_DATA_MISMATCH,
                    f"transfer syntax {self.tsyntax} is compressed (encapsulated) but the pixel "
                    "data is not in fragments; the sender mislabels its transfer syntax",
                )
            return 0
        if pixels.length is None:
            raise self.refuse(
                PIXEL_DATA_MISMATCH,
                f"the pixel data is in fragments (compressed) but transfer syntax {self.tsyntax} "
                "is uncompressed; the sender mislabels its transfer syntax",
            )
        expected = (rows * columns * frames * samples * bits + 7) // 8
        if samples == 3 and _text_value(elements, "PhotometricInterpretation") == "YBR_FULL_422":
            expected = expected // 3 * 2  # two chroma samples for every two pixels
        if pixels.length not in (expected, expected + expected % 2):  # even-length padding
            raise self.refuse(
                PIXEL_DATA_MISMATCH,
                f"the pixel data is {pixels.length} bytes but {rows}x{columns}x{frames} pixels "
                f"of {samples} x {bits} bits take {expected}; the file is corrupt",
            )
        return pixels.length

    def check_fragments(self, pixels: PixelData) -> None:
        """Encapsulated pixel data: an offset table, then at least a fragment per frame."""
        if pixels.length is not None:
            return
        if pixels.offset_table_length is None or pixels.offset_table_length % 4:
            raise self.refuse(
                PIXEL_DATA_MISMATCH,
                "the encapsulated pixel data does not begin with a Basic Offset Table item",
            )
        if pixels.fragments < self.frames:
            raise self.refuse(
                PIXEL_DATA_MISMATCH,
                f"the encapsulated pixel data has {pixels.fragments} fragment(s) for "
                f"{self.frames} frame(s); every frame needs at least one",
            )


def _shown(value: int | None) -> str:
    return "missing" if value is None else str(value)


def _us(elements: dict[BaseTag, RawDataElement], keyword: str, name: str) -> int | None:
    """A US value (None if absent or empty); bad-dimensions if it is not one."""
    element = elements.get(BaseTag(_TAGS[keyword]))
    if element is None or not element.value:
        return None
    if len(element.value) != 2:
        raise InvalidInstance("bad-dimensions", f"{name}: {keyword} is not one 16-bit number")
    return int.from_bytes(element.value, "little" if element.is_little_endian else "big")


# An Integer String (PS3.5 6.2): pydicom also takes an integral decimal ("2.0").
_IS = re.compile(rb" *([+-]?)0*([0-9]+)(?:\.0*)? *")
_HUGE = 10**20  # stands for any number with more digits: beyond every limit here


class _NotAnInteger(ValueError):
    pass


def _is(elements: dict[BaseTag, RawDataElement], keyword: str) -> int | None:
    """An IS value (None if absent or empty); _NotAnInteger unless it is one integer."""
    element = elements.get(BaseTag(_TAGS[keyword]))
    value = element.value.rstrip(b"\0 ") if element is not None and element.value else b""
    if not value:
        return None
    match = _IS.fullmatch(value)
    if match is None:
        raise _NotAnInteger
    number = _HUGE if len(match[2]) > 20 else int(match[2])  # int() of 5000 digits raises
    return -number if match[1] == b"-" else number


def _frames(elements: dict[BaseTag, RawDataElement], name: str) -> int:
    try:
        frames = _is(elements, "NumberOfFrames")
    except _NotAnInteger:
        raise InvalidInstance(
            "bad-dimensions", f"{name}: NumberOfFrames is not one integer"
        ) from None
    if frames is None:
        return 1
    if frames <= 0:
        raise InvalidInstance(
            "bad-dimensions", f"{name}: NumberOfFrames is {frames}; an image has at least one"
        )
    return frames


def _int32(
    elements: dict[BaseTag, RawDataElement], keyword: str, unusable: list[str]
) -> int | None:
    try:
        number = _is(elements, keyword)
    except _NotAnInteger:
        number = _HUGE  # as unusable as a number out of range
    if number is None or number in _INT32:
        return number
    unusable.append(keyword)
    return None


def _text_value(elements: dict[BaseTag, RawDataElement], keyword: str) -> str:
    element = elements.get(BaseTag(_TAGS[keyword]))
    value = element.value if element is not None and element.value else b""
    return value.rstrip(b"\0 ").decode("ascii", "replace").strip()


# A UID component other than "0" starts with a non-zero digit (PS3.5 9.1).
_LEADING_ZERO = re.compile(r"(?:^|\.)0[0-9]")


def _uid(values: _Values, keyword: str, name: str) -> str:
    value = values.ascii(keyword, "UI")
    value = (values.text(keyword) if value is None else value).strip()
    if not value:
        raise InvalidInstance("missing-uid", f"{name}: required {keyword} is missing")
    try:
        check_uid(value, keyword)
    except ValueError as exc:
        raise InvalidInstance("invalid-uid", f"{name}: {exc}") from None
    if _LEADING_ZERO.search(value):
        raise InvalidInstance(
            "invalid-uid",
            f"{name}: {keyword} {value!r} has a component with a leading zero, which DICOM "
            "forbids (PS3.5 9.1); the sender must generate valid UIDs",
        )
    return value


# pydicom turns each value read into a DataElement through its raw-element hooks, VR lookup and
# value validation: ~30 µs apiece. For the usual value, a single printable-ASCII string in the
# element's standard VR, that conversion comes down to decoding the bytes and dropping trailing
# NUL/space padding. So _Values reads the raw bytes in that case and hands anything else
# (another VR, non-ASCII or escape sequences, several values...) to pydicom.
_PRINTABLE = re.compile(rb"[ -\[\]-~]*")  # printable ASCII but backslash, the value separator
_PRINTABLE_MULTI = re.compile(rb"[ -~]*")
# pydicom decodes these VRs with the SpecificCharacterSet, the others always as ISO-IR 6.
_CHARSET_VRS = frozenset({"SH", "LO"})


class _Values:
    """The values read, taken from their raw bytes where pydicom's conversion is trivial."""

    def __init__(self, elements: dict[BaseTag, RawDataElement]) -> None:
        self.elements = elements
        self.raw = {int(tag): element for tag, element in elements.items()}

    @cached_property
    def ds(self) -> Dataset:
        """The elements as a pydicom dataset (converted on access, in its character set).

        A value a sender labelled with another VR than the data dictionary's is converted as
        UN, that is as the dictionary says: pydicom's converters for the VR claimed could fail
        on it (a binary VR on text) or not exist (an unknown VR).
        """
        return Dataset(
            {
                tag: raw if raw.VR in (None, dictionary_VR(tag)) else raw._replace(VR="UN")
                for tag, raw in self.elements.items()
            }
        )

    def ascii(self, name: str, vr: str, *, multi: bool = False) -> str | None:
        """The value as pydicom would decode it if that is plain ASCII ("" if absent: callers
        treat both alike), else None: convert it with pydicom."""
        raw = self.raw.get(_TAGS[name])
        if raw is None:
            return ""
        if raw.VR not in (vr, None):  # None: implicit VR
            return None
        value = (raw.value or b"").rstrip(b"\0 ")
        if not (_PRINTABLE_MULTI if multi else _PRINTABLE).fullmatch(value):
            return None
        if vr in _CHARSET_VRS and not self.ascii_charset:
            return None
        return value.decode("ascii")

    def converted(self, name: str) -> object:
        """pydicom's value (None if absent). pydicom replaces what it cannot decode, with a
        warning, unless its validation mode is RAISE: then the value counts as absent."""
        try:
            return self.ds.get(name)
        except (ValueError, LookupError):
            return None

    def text(self, name: str) -> str:
        """The value as text; several values joined by backslashes, as the file holds them."""
        return as_text(self.converted(name))

    @cached_property
    def ascii_charset(self) -> bool:
        """Whether printable ASCII decodes to itself in the dataset's SpecificCharacterSet.

        True of every character set DICOM defines (checked in the tests), but pydicom also
        takes any Python codec name there (say "cp037", EBCDIC): then only pydicom decodes right.
        """
        element = self.raw.get(_SPECIFIC_CHARACTER_SET)
        if element is None:
            return True
        terms = (element.value or b"").rstrip(b"\0 ").decode("latin-1").split("\\")
        return all(term.strip() in python_encoding for term in terms)


def _text(values: _Values, name: str, vr: str, limit: int) -> str | None:
    fast = values.ascii(name, vr)
    return (values.text(name) if fast is None else fast).strip()[:limit] or None


def _image_type(values: _Values) -> str | None:
    fast = values.ascii("ImageType", "CS", multi=True)
    if fast is not None:
        parts: list[object] = list(fast.split("\\"))
    else:
        value = values.converted("ImageType")
        if value is None or value == "":
            return None
        parts = [value] if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    return "\\".join(str(v).strip().upper() for v in parts)[:128] or None


def _numbers(
    values: _Values, name: str, count: int, *, positive: bool = False
) -> tuple[float, ...] | None:
    """A DS value of exactly ``count`` finite numbers (all > 0 with ``positive``), else None:
    geometry that is missing or malformed is as unusable as geometry that is absent."""
    fast = values.ascii(name, "DS", multi=True)
    parts: list[object] = []
    if fast:
        parts = list(fast.split("\\"))
    elif fast is None:
        converted = values.converted(name)
        if isinstance(converted, MultiValue):
            parts = list(converted)
        elif converted is not None:
            parts = [converted]
    try:
        numbers = tuple(float(str(part).strip()) for part in parts)
    except ValueError:
        return None
    if len(numbers) != count or not all(math.isfinite(n) for n in numbers):
        return None
    if positive and not all(n > 0 for n in numbers):
        return None
    return numbers


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
