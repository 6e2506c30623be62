"""Property: whatever bytes arrive, read_header returns a header or refuses with a known reason.

Hypothesis starts from valid instances (explicit and implicit VR, big endian, RLE and JPEG
fragments, deflated, with sequences of defined and undefined length) and spoils them the ways
transfers and senders do: bytes flipped, cut, inserted or deleted, values and length fields
rewritten, sequences nested hundreds deep, the transfer syntax claimed wrongly. Nothing but
InvalidInstance may come out (no struct.error, zlib.error, RecursionError, OverflowError,
NotImplementedError...), each example in bounded time, and an accepted header's values must
fit the index.

In ``make test`` it runs 300 examples from a fixed seed (reproducible in CI). To hunt for more,
locally, with a fresh seed each run:

    RADFLOW_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/dicom/test_instance_fuzz.py
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from part10 import dataset, jpeg, meta_end, nested, part10, save
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)

from radflow.dicom.instance import read_header
from radflow.errors import InvalidInstance
from radflow.ingest.receiver.statuses import FAILURE_STATUS
from radflow.settings import Settings

EXAMPLES = int(os.environ.get("RADFLOW_FUZZ_EXAMPLES", "300"))
CI = "RADFLOW_FUZZ_EXAMPLES" not in os.environ
KNOWN_REASONS = frozenset(FAILURE_STATUS)
MAX_PIXELS = Settings().max_pixels
INT32 = range(-(2**31), 2**31)


@dataclass(frozen=True)
class Base:
    """A valid instance: its transfer syntax and data set bytes (inflated, if deflated)."""

    syntax: str
    body: bytes
    # (offset, size) of every length field, and where each element header starts.
    lengths: tuple[tuple[int, int], ...]
    starts: tuple[int, ...]


def _instance() -> Dataset:
    ds = dataset(np.arange(2 * 16 * 16, dtype=np.uint16).reshape(2, 16, 16))
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDescription = "Thorax Übersicht"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "CT", "DCM"
    ds.ProcedureCodeSequence = Sequence([code])
    reference = Dataset()
    reference.ReferencedSOPInstanceUID = "1.2.3.4.5"
    reference.PurposeOfReferenceCodeSequence = Sequence([code])
    reference.is_undefined_length_sequence_item = True
    ds.ReferencedImageSequence = Sequence([reference])
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
        found.append(Base(syntax, body, base.lengths, base.starts))
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


@st.composite
def received(draw: st.DrawFn) -> bytes:
    """A valid instance spoilt up to four ways, as a Part 10 file."""
    base = draw(st.sampled_from(bases()))
    syntax, body = base.syntax, bytearray(base.body)
    little = syntax != ExplicitVRBigEndian
    after: list[tuple[str, int, int]] = []  # spoils of the file as written (meta, deflate)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(
            st.sampled_from(
                ["flip", "cut", "insert", "delete", "length", "value", "nest", "syntax", "file"]
            )
        )
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
    data = bytearray(part10(bytes(body), syntax))
    for kind, at, byte in after:
        at = 132 + at % max(len(data) - 132, 1)  # the preamble matters to nobody
        if kind == "flip" and at < len(data):
            data[at] = byte
        else:
            del data[at:]
    return bytes(data)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_the_bases_are_valid(folder: Path) -> None:
    path = folder / "base.dcm"
    for base in bases():
        body = base.body
        if base.syntax == DeflatedExplicitVRLittleEndian:
            compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            body = compressor.compress(body) + compressor.flush()
        path.write_bytes(part10(body, base.syntax))
        header = read_header(path, MAX_PIXELS)
        assert (header.rows, header.frames, header.study_description) == (
            16 if base.syntax != JPEGBaseline8Bit else 64,
            2,
            "Thorax Übersicht",
        ), base.syntax
        assert len(base.lengths) > 20 and base.starts, base.syntax


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's, about the values it converts
@settings(
    max_examples=EXAMPLES,
    derandomize=CI,
    database=None if CI else settings.default.database,
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=received())
def test_any_file_gets_a_header_or_a_known_reason(folder: Path, data: bytes) -> None:
    path = folder / "received.dcm"
    path.write_bytes(data)

    try:
        header = read_header(path, MAX_PIXELS)
    except InvalidInstance as refused:
        assert refused.reason in KNOWN_REASONS, refused
        assert str(refused).startswith("received.dcm: ")
        event(refused.reason)  # see them with --hypothesis-show-statistics
        return
    event("accepted")

    assert 1 <= header.rows <= 0xFFFF and 1 <= header.columns <= 0xFFFF
    assert header.frames >= 1 and header.frames in INT32
    assert header.series_number is None or header.series_number in INT32
    assert header.instance_number is None or header.instance_number in INT32
    for uid in (header.sop_instance_uid, header.series_uid, header.study_uid):
        assert 0 < len(uid) <= 64
    assert header.size_bytes == len(data)
