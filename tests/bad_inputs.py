"""Inputs that broke ingest, made in code: files that fail unforeseen, values the database
refuses, other encodings of one instance, and a zip whose member inflates to 1 GiB."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from factories import dicom_bytes
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)


def changed(data: bytes, change: Callable[[Dataset], object]) -> bytes:
    """``data`` read, changed by ``change`` and written again (values unvalidated)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    with pydicom.config.disable_value_validation():
        change(ds)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def failing_unforeseen() -> dict[str, bytes]:
    """Files on which reading raised what nobody caught: zlib.error, NotImplementedError (an
    unknown VR) and pydicom's BytesLengthException (a 3-byte US value)."""
    deflated = changed(
        dicom_bytes(),
        lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", DeflatedExplicitVRLittleEndian),
    )
    middle = len(deflated) // 2
    corrupt_deflate = deflated[:middle] + b"\xff" * 40 + deflated[middle + 40 :]
    data = dicom_bytes()
    unknown_vr = data.replace(b"\x02\x00\x10\x00UI", b"\x02\x00\x10\x00U\x84", 1)
    rows = struct.pack("<HH", 0x0028, 0x0010) + b"US\x02\x00"
    at = data.index(rows)
    odd_length = (
        data[:at] + rows[:-2] + b"\x03\x00" + data[at + 8 : at + 10] + b"\0" + data[at + 10 :]
    )
    return {"deflate.dcm": corrupt_deflate, "vr.dcm": unknown_vr, "odd.dcm": odd_length}


def reencoded(data: bytes) -> dict[str, bytes]:
    """The instance of ``data`` again, in other bytes that decode to the same pixels."""

    def compressed(syntax: str) -> Callable[[Dataset], object]:
        return lambda ds: ds.compress(syntax, generate_instance_uid=False)

    return {
        "implicit.dcm": changed(
            data, lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", ImplicitVRLittleEndian)
        ),
        "rle.dcm": changed(data, compressed(RLELossless)),
        "jpegls.dcm": changed(data, compressed(JPEGLSLossless)),
        "j2k.dcm": changed(data, compressed(JPEG2000Lossless)),
        "jpeg-lossless.dcm": changed(data, _as_jpeg_lossless),
        "group-lengths.dcm": with_group_lengths(data),
        "meta.dcm": changed(
            data, lambda ds: setattr(ds.file_meta, "ImplementationVersionName", "OTHER_SENDER")
        ),
    }


def _as_jpeg_lossless(ds: Dataset) -> None:
    """Re-encode as JPEG Lossless SV1: no installed library encodes it (pylibjpeg-libjpeg only
    decodes), so here is the smallest encoder of ITU T.81 process 14, predictor 1, for up to
    15 bits stored (16 would need the category 16 case, which has no extra bits)."""
    pixels, precision = ds.pixel_array.astype(np.int64), int(ds.BitsStored)
    rows, columns = pixels.shape
    # Prediction (H.1.2.1): 2^(P-1) first, the left sample on the first row, the one above in the
    # first column, the left one elsewhere (predictor 1).
    predicted = np.empty_like(pixels)
    predicted[0, 0] = 1 << (precision - 1)
    predicted[0, 1:] = pixels[0, :-1]
    predicted[1:, 0] = pixels[:-1, 0]
    predicted[1:, 1:] = pixels[1:, :-1]
    bits = []
    for diff in (pixels - predicted).ravel().tolist():
        size = abs(diff).bit_length()  # the category SSSS; its Huffman code is 5 bits, = SSSS
        extra = diff if diff >= 0 else diff - 1
        bits.append(f"{size:05b}" + (f"{extra & ((1 << size) - 1):0{size}b}" if size else ""))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)  # pad with 1-bits (F.1.2.3)
    entropy = bytes(int(stream[i : i + 8], 2) for i in range(0, len(stream), 8))
    entropy = entropy.replace(b"\xff", b"\xff\x00")  # byte stuffing (F.1.2.3)

    def segment(marker: int, payload: bytes) -> bytes:
        return struct.pack(">HH", marker, len(payload) + 2) + payload

    frame = struct.pack(">BHHBBBB", precision, rows, columns, 1, 1, 0x11, 0)
    # One Huffman table: the 17 categories 0..16, each a 5-bit code.
    table = bytes([0]) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    scan = bytes([1, 1, 0x00, 1, 0, 0])  # one component, table 0, predictor 1, Se 0, Al 0
    jpeg = (
        b"\xff\xd8"
        + segment(0xFFC3, frame)
        + segment(0xFFC4, table)
        + segment(0xFFDA, scan)
        + entropy
        + b"\xff\xd9"
    )
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"


def with_group_lengths(data: bytes) -> bytes:
    """``data`` (explicit VR little endian) with a group length (gggg,0000) before each group,
    as older modalities send them: retired, and never written by pydicom."""
    meta_end = 144 + struct.unpack_from("<I", data, 140)[0]  # preamble, DICM, (0002,0000)
    ds = pydicom.dcmread(io.BytesIO(data))
    out = [data[:meta_end]]
    for group in sorted({element.tag.group for element in ds}):
        encoded = DicomBytesIO()
        encoded.is_little_endian, encoded.is_implicit_VR = True, False
        write_dataset(encoded, Dataset({e.tag: e for e in ds if e.tag.group == group}))
        body = encoded.getvalue()
        out += [struct.pack("<HH2sHI", group, 0, b"UL", 4, len(body)), body]
    return b"".join(out)


def zip_of_zeros(path: Path, member: str, size: int) -> None:
    """A zip whose one member inflates to ``size`` zero bytes, written in about size/1000.

    Deflate each MiB of zeros after a full flush and the output is the same every time (a full
    flush forgets what came before), so the member is one compressed MiB written size/MiB times:
    built in a fraction of a second, never holding more than a MiB.
    """
    mib = 1 << 20
    assert size % mib == 0 and size < 1 << 32  # no zip64 needed
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = compressor.compress(bytes(mib)) + compressor.flush(zlib.Z_FULL_FLUSH)
    end = compressor.flush(zlib.Z_FINISH)
    crc = 0
    for _ in range(size // mib):
        crc = zlib.crc32(bytes(mib), crc)
    compressed = len(block) * (size // mib) + len(end)
    name = member.encode()
    # PS: APPNOTE.TXT 4.3.7 (local header), 4.3.12 (central directory), 4.3.16 (end record).
    local = struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, compressed, size, len(name), 0
    )
    central = struct.pack(
        "<IHHHHHHIIIHHHHHII",
        0x02014B50,
        20,
        20,
        0,
        8,
        0,
        0x21,
        crc,
        compressed,
        size,
        len(name),
        0,
        0,
        0,
        0,
        0,
        0,
    )
    with path.open("wb") as f:
        f.write(local + name)
        for _ in range(size // mib):
            f.write(block)
        f.write(end)
        directory_at = f.tell()
        f.write(central + name)
        directory_size = f.tell() - directory_at
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, directory_size, directory_at, 0))
