"""Malformed instances, generated: each a Part 10 file (bytes) that once stopped the receiver.

``REFUSED`` are refused before the acknowledgement (a failure status); ``POISON`` pass every
check the header allows and break later, in the indexer or the database.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable

import pydicom
from factories import dicom_bytes
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

_UNDEFINED = 0xFFFFFFFF
_ITEM = struct.pack("<HHL", 0xFFFE, 0xE000, _UNDEFINED)
_ITEM_END = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
_SEQUENCE_END = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
# (0008,1115) Referenced Series Sequence: between Modality (0008,0060) and the patient module.
_SEQUENCE_TAG = (0x0008, 0x1115)


def valid() -> Dataset:
    return pydicom.dcmread(io.BytesIO(dicom_bytes()))


def part10(ds: Dataset, body: bytes | None = None, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """``ds``'s file meta information and ``body`` (default ``ds`` encoded) as a Part 10 file."""
    if body is None:
        body = _encode(ds)
    out = io.BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    meta = ds.file_meta
    meta.TransferSyntaxUID = syntax
    write_file_meta_info(out, meta, enforce_standard=True)  # type: ignore[arg-type]
    return out.getvalue() + body


def _encode(ds: Dataset) -> bytes:
    """``ds`` as Explicit VR Little Endian data set bytes."""
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return out.getvalue()


def _with_sequence(nesting: bytes, cut: int | None = None) -> bytes:
    """A valid instance with ``nesting`` spliced in as (0008,1115), cut ``cut`` bytes after it."""
    ds = valid()
    low, high = Dataset(), Dataset()
    for elem in ds:
        (low if (elem.tag.group, elem.tag.elem) < _SEQUENCE_TAG else high).add(elem)
    low.file_meta = ds.file_meta
    head = _encode(low) + struct.pack("<HH2sHL", *_SEQUENCE_TAG, b"SQ", 0, _UNDEFINED)
    body = head + nesting + _encode(high)
    if cut is not None:
        body = body[: len(head) + cut]
    return part10(low, body)


def nested(depth: int) -> bytes:
    """The value of a sequence whose one item holds a sequence, ``depth`` deep, all of
    undefined length."""
    value = _SEQUENCE_END
    for _ in range(depth):
        header = struct.pack("<HH2sHL", *_SEQUENCE_TAG, b"SQ", 0, _UNDEFINED)
        value = _ITEM + header + value + _ITEM_END + _SEQUENCE_END
    return value


def deep_sequences() -> bytes:
    return _with_sequence(nested(600))


def cut_in_sequence() -> bytes:
    """Cut short inside a nested sequence: the pixel data and everything after are missing."""
    return _with_sequence(nested(4), cut=18)


def deflated_garbage() -> bytes:
    """Claims Deflated Explicit VR Little Endian; the body is no deflate stream."""
    return part10(valid(), os.urandom(4096), DeflatedExplicitVRLittleEndian)


def deflated_cut() -> bytes:
    """A real deflate stream of a valid data set, cut in the middle."""
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    stream = compressor.compress(_encode(valid())) + compressor.flush()
    return part10(valid(), stream[: len(stream) // 2], DeflatedExplicitVRLittleEndian)


def _changed(**values: object) -> Callable[[], bytes]:
    def make() -> bytes:
        ds = valid()
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        return part10(ds)

    return make


def _raw_text(keyword: str, value: bytes) -> Callable[[], bytes]:
    """A text element holding exactly ``value`` (pydicom would not write a NUL inside it)."""

    def make() -> bytes:
        ds = valid()
        setattr(ds, keyword, "X" * len(value))
        data = part10(ds)
        assert data.count(b"X" * len(value)) == 1
        return data.replace(b"X" * len(value), value)

    return make


# Refused before the acknowledgement today: pydicom raises something else than InvalidInstance.
REFUSED: dict[str, Callable[[], bytes]] = {
    "deep-sequences": deep_sequences,
    "cut-in-sequence": cut_in_sequence,
    "deflated-garbage": deflated_garbage,
    "deflated-cut": deflated_cut,
}
# Acknowledged, then break the indexer or the database: legal values or text that the header
# check passes.
POISON: dict[str, Callable[[], bytes]] = {
    "instance-number-20-digits": _changed(InstanceNumber="12345678901234567890"),
    "instance-number-overflows-integer": _changed(InstanceNumber="999999999999"),
    "nul-in-text": _raw_text("StudyDescription", b"CHEST\x00PA"),
}
