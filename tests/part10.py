"""Byte-level builders for DICOM files as senders can send them, valid or not (PS3.10, PS3.5).

A receiver writes the preamble and file meta information itself and then the data set bytes
exactly as they came over the network, so most of these build a real meta and splice any
bytes after it.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pydicom
from factories import dicom_bytes
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

DEEP_SEQUENCE = Tag("ContentSequence")


def dataset(pixels: np.ndarray | None = None) -> Dataset:
    """A valid instance (64 x 64, 16 bits unless ``pixels`` says otherwise) to spoil."""
    return pydicom.dcmread(io.BytesIO(dicom_bytes(pixels)))


def jpeg(frames: int) -> Dataset:
    """An 8-bit JPEG Baseline instance of ``frames`` 64 x 64 frames (one fragment each)."""
    ds = dataset()
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(buffer, "JPEG")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([buffer.getvalue()] * frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


def save(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """``ds`` as a Part 10 file in ``syntax`` (deflated, implicit... as pydicom writes them)."""
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def meta_end(data: bytes) -> int:
    """Where the data set starts in a Part 10 file written by pydicom (group length first)."""
    (meta_length,) = struct.unpack_from("<I", data, 140)
    return 144 + meta_length


def part10(body: bytes, syntax: str, sop_instance_uid: str = "1.2.3.4") -> bytes:
    """Preamble, DICM and file meta information for ``syntax`` ("": no TransferSyntaxUID),
    then ``body`` as it is."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    if syntax:  # else none at all
        meta.TransferSyntaxUID = syntax
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=bool(syntax))
    return b"\0" * 128 + b"DICM" + buffer.getvalue() + body


def deflate(data: bytes) -> bytes:
    """A file in Explicit VR Little Endian, its data set deflated (PS3.5 A.5)."""
    start = meta_end(data)
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = compressor.compress(data[start:]) + compressor.flush()
    return part10(body, DeflatedExplicitVRLittleEndian)


def element(tag: int, vr: bytes, value: bytes, *, length: int | None = None) -> bytes:
    """One Explicit VR Little Endian element, ``length`` written instead of the real one."""
    length = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"OF", b"OD"):
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, length) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, length) + value


def nested(depth: int, *, implicit: bool = False) -> bytes:
    """``depth`` sequences of undefined length, each in the only item of the one before."""
    if implicit:
        sequence = struct.pack("<HHL", DEEP_SEQUENCE.group, DEEP_SEQUENCE.element, 0xFFFFFFFF)
    else:
        sequence = element(DEEP_SEQUENCE, b"SQ", b"", length=0xFFFFFFFF)
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    sequence_end = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return (sequence + item) * depth + (item_end + sequence_end) * depth


def insert_before_pixel_data(data: bytes, extra: bytes, *, implicit: bool = False) -> bytes:
    """``extra`` spliced in just before the pixel data element (its place in tag order for
    anything in groups 0029-7FDF)."""
    at = data.index(b"\xe0\x7f\x10\x00" + (b"" if implicit else b"O"))
    return data[:at] + extra + data[at:]
