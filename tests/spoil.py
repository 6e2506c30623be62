"""Valid instances spoilt the ways transfers and senders spoil them (hypothesis strategies),
shared by the fuzz tests of read_header (tests/dicom) and of the receiver (tests/ingest/receiver).

The bases: explicit and implicit VR, big endian, RLE and JPEG fragments, deflated, with
sequences of defined and undefined length. The spoils: bytes flipped, cut, inserted or deleted,
values and length fields rewritten, sequences nested hundreds deep, the transfer syntax claimed
wrongly, the file meta spoilt.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import numpy as np
from hypothesis import strategies as st
from part10 import dataset, jpeg, meta_end, nested, part10, save
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)


@dataclass(frozen=True)
class Base:
    """A valid instance: its transfer syntax and data set bytes (inflated, if deflated)."""

    syntax: str
    body: bytes
    # (offset, size) of every length field, and where each element header starts.
    lengths: tuple[tuple[int, int], ...]
    starts: tuple[int, ...]
    uids: tuple[str, str] = ("", "")  # its SOP Class and SOP Instance UIDs


def _instance() -> Dataset:
    ds = dataset(np.arange(2 * 16 * 16, dtype=np.uint16).reshape(2, 16, 16))
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDescription = "Thorax Übersicht"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "CT", "DCM"
    ds.ProcedureCodeSequence = DicomSequence([code])
    reference = Dataset()
    reference.ReferencedSOPInstanceUID = "1.2.3.4.5"
    reference.PurposeOfReferenceCodeSequence = DicomSequence([code])
    reference.is_undefined_length_sequence_item = True
    ds.ReferencedImageSequence = DicomSequence([reference])
    ds.ReferencedImageSequence.is_undefined_length = True
    return ds


def _fields(body: bytes, ds: Dataset, implicit: bool, little: bool) -> Base:
    """Where the length fields are: found by looking for each tag the data set holds."""
    order = "<" if little else ">"
    lengths: list[tuple[int, int]] = []
    starts: list[int] = []
    tags = {element.tag for element in ds.iterall()} | {0x7FE00010}
    for tag in tags:
        packed = struct.pack(f"{order}HH", tag >> 16, tag & 0xFFFF)
        at = body.find(packed)
        while at >= 0:
            vr = body[at + 4 : at + 6]
            if implicit:
                lengths.append((at + 4, 4))
            elif vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
                lengths.append((at + 8, 4))
            elif vr.isalpha() and vr.isupper():
                lengths.append((at + 6, 2))
            else:
                at = body.find(packed, at + 1)
                continue
            starts.append(at)
            at = body.find(packed, at + 1)
    for item in (0xE000, 0xE00D, 0xE0DD):
        packed = struct.pack(f"{order}HH", 0xFFFE, item)
        at = body.find(packed)
        while at >= 0:
            lengths.append((at + 4, 4))
            at = body.find(packed, at + 1)
    return Base("", body, tuple(sorted(lengths)), tuple(sorted(starts)))


@cache
def bases() -> tuple[Base, ...]:
    found = []
    for syntax in (
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
        RLELossless,
        JPEGBaseline8Bit,
    ):
        ds = _instance()
        if syntax == RLELossless:
            ds.compress(RLELossless, generate_instance_uid=False)
        elif syntax == JPEGBaseline8Bit:
            spoilt = jpeg(2)
            for element in ds:
                if element.keyword.endswith("Sequence") or element.tag < 0x00280000:
                    spoilt[element.tag] = element
            ds = spoilt
        if syntax == ExplicitVRBigEndian:
            fresh = Dataset()  # pydicom will not write a data set read as little endian as big
            for element in ds:
                fresh.add(element)
            fresh.file_meta = ds.file_meta
            ds = fresh
        data = save(ds, syntax)
        body = data[meta_end(data) :]
        if syntax == DeflatedExplicitVRLittleEndian:
            body = zlib.decompress(body, -zlib.MAX_WBITS)
        base = _fields(body, ds, syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian)
        uids = (str(ds.SOPClassUID), str(ds.SOPInstanceUID))
        found.append(Base(syntax, body, base.lengths, base.starts, uids))
    return tuple(found)


SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGBaseline8Bit,
    "1.2.840.10008.1.2.4.100",  # MPEG2: unsupported
    "",
]
LENGTHS = [0, 1, 2, 3, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF]


# Spoils of the data set's bytes, and ("file") of the Part 10 file as written (its meta).
BODY_SPOILS = ["flip", "cut", "insert", "delete", "length", "value", "nest", "syntax"]


class Spoilt(NamedTuple):
    base: Base  # what was spoilt
    syntax: str  # the transfer syntax claimed
    body: bytes  # the data set as sent (deflated if it claims deflate)
    after: list[tuple[str, int, int]]  # spoils left for the Part 10 file as written


@st.composite
def spoilt(draw: st.DrawFn, kinds: Sequence[str]) -> Spoilt:
    """A valid instance spoilt up to four ways of ``kinds``."""
    base = draw(st.sampled_from(bases()))
    syntax, body = base.syntax, bytearray(base.body)
    little = syntax != ExplicitVRBigEndian
    after: list[tuple[str, int, int]] = []  # spoils of the file as written (meta, deflate)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(kinds))
        at = draw(st.integers(0, max(len(body) - 1, 0)))
        if kind == "flip" and body:
            body[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del body[at:]
        elif kind == "insert":
            body[at:at] = draw(st.binary(max_size=64))
        elif kind == "delete":
            del body[at : at + draw(st.integers(1, 64))]
        elif kind == "length":
            offset, size = draw(st.sampled_from(base.lengths))
            value = draw(st.sampled_from(LENGTHS) | st.integers(0, 2**32 - 1)) % (256**size)
            packed = value.to_bytes(size, "little" if little else "big")
            body[offset : offset + size] = packed
        elif kind == "value":  # the start of a value: US numbers, IS and UID text
            offset, size = draw(st.sampled_from(base.lengths))
            value = draw(st.binary(min_size=1, max_size=2))
            body[offset + size : offset + size + len(value)] = value
        elif kind == "nest":
            start = draw(st.sampled_from(base.starts))
            depth = draw(st.integers(1, 700))
            body[start:start] = nested(depth, implicit=syntax == ImplicitVRLittleEndian)
        elif kind == "syntax":
            syntax = draw(st.sampled_from(SYNTAXES))
        else:
            after.append((draw(st.sampled_from(["flip", "cut"])), at, draw(st.integers(0, 255))))
    if syntax == DeflatedExplicitVRLittleEndian and base.syntax == syntax:
        compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = bytearray(compressor.compress(bytes(body)) + compressor.flush())
    return Spoilt(base, syntax, bytes(body), after)


def data_sets() -> st.SearchStrategy[Spoilt]:
    """What a sender can send: data sets spoilt, under the transfer syntax they claim."""
    return spoilt(BODY_SPOILS)


@st.composite
def received(draw: st.DrawFn) -> bytes:
    """A valid instance spoilt up to four ways, as a Part 10 file."""
    _, syntax, body, after = draw(spoilt([*BODY_SPOILS, "file"]))
    data = bytearray(part10(body, syntax))
    for kind, at, byte in after:
        at = 132 + at % max(len(data) - 132, 1)  # the preamble matters to nobody
        if kind == "flip" and at < len(data):
            data[at] = byte
        else:
            del data[at:]
    return bytes(data)
