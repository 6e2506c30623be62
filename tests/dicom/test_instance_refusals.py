"""read_header refuses every broken file with its most specific reason, in bounded memory.

Each case here is a file a sender has sent or could send: bytes that are no data set at all,
files cut short anywhere, poison values, hostile nesting, a deflated data set that is garbage,
cut or a decompression bomb, and instances whose header contradicts their pixel data. Every
input is generated here, with pydicom or byte by byte (tests/dicom/part10.py).
"""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from part10 import (
    dataset,
    deflate,
    element,
    insert_before_pixel_data,
    jpeg,
    meta_end,
    nested,
    part10,
    save,
)
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)

from radflow.dicom.instance import InstanceHeader, read_header
from radflow.errors import InvalidInstance

LIMIT = 10**9


def _refused(tmp_path: Path, data: bytes, max_pixels: int = LIMIT) -> InvalidInstance:
    path = tmp_path / "received.dcm"
    path.write_bytes(data)
    with pytest.raises(InvalidInstance) as refused:
        read_header(path, max_pixels)
    return refused.value


def _accepted(tmp_path: Path, data: bytes) -> InstanceHeader:
    path = tmp_path / "received.dcm"
    path.write_bytes(data)
    return read_header(path, LIMIT)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (16, 16)).save(buffer, "PNG")
    return buffer.getvalue()


_NOT_DICOM = {
    "text": b"Dear colleague, please find the report attached.\n" * 20,
    "png": _png(),
    "random": np.random.default_rng(7).bytes(4000),
    "zeros": bytes(1000),
}


# ---- 1. the right reason ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(_NOT_DICOM))
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_bytes_that_are_no_data_set_are_not_dicom_even_after_a_valid_meta(
    tmp_path: Path, kind: str, syntax: str
) -> None:
    # What a receiver writes when a sender's data set is a text file, a PNG or noise: its own
    # preamble and meta, then those bytes.
    refused = _refused(tmp_path, part10(_NOT_DICOM[kind], syntax))

    assert refused.reason == "not-dicom"
    assert "not a DICOM" in str(refused)


@pytest.mark.parametrize("kind", sorted(_NOT_DICOM))
def test_files_that_are_no_dicom_at_all_are_not_dicom(tmp_path: Path, kind: str) -> None:
    assert _refused(tmp_path, _NOT_DICOM[kind]).reason == "not-dicom"


def _with_sequence(*, undefined: bool) -> bytes:
    """A valid instance with a sequence before its UIDs (group 0008 comes before 0020)."""
    ds = dataset()
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator = "CT", "DCM"
    item.TextValue = "a long text value: an element with a 32-bit length inside an item"
    item.is_undefined_length_sequence_item = undefined
    ds.ProcedureCodeSequence = Sequence([item])
    ds.ProcedureCodeSequence.is_undefined_length = undefined
    return save(ds)


@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined"])
@pytest.mark.parametrize(
    "where", ["sequence-length", "item-header", "in-item", "text-length", "text-value"]
)
def test_a_file_cut_inside_a_nested_sequence_is_truncated(
    tmp_path: Path, undefined: bool, where: str
) -> None:
    data = _with_sequence(undefined=undefined)
    assert _accepted(tmp_path, data).rows == 64
    text = data.index(b"\x40\x00\x60\xa1UT")  # TextValue (0040,A160), inside the item
    cut = {
        # In the sequence's 32-bit length: pydicom raised struct.error.
        "sequence-length": data.index(b"\x08\x00\x32\x10SQ") + 10,
        "item-header": data.index(b"\xfe\xff\x00\xe0") + 4,
        "in-item": data.index(b"DCM") + 1,
        "text-length": text + 10,
        "text-value": text + 20,
    }[where]

    assert _refused(tmp_path, data[:cut]).reason == "truncated"


@pytest.mark.parametrize("cut", [8, 30])
def test_a_file_cut_after_its_encapsulated_pixel_data_is_truncated(
    tmp_path: Path, cut: int
) -> None:
    ds = dataset(np.random.default_rng(0).integers(0, 4096, (2, 64, 64), dtype=np.uint16))
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 64)  # Data Set Trailing Padding
    data = save(ds, RLELossless)

    assert _refused(tmp_path, data[:-cut]).reason == "truncated"


# ---- 2. poison values ------------------------------------------------------------------------


def _set_raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> None:
    tag = pydicom.tag.Tag(keyword)
    ds[tag] = pydicom.dataelem.RawDataElement(tag, vr, len(value), value, 0, False, True)


@pytest.mark.parametrize(
    ("value", "number", "unusable"),
    [
        (b"1" * 20, None, True),
        (b"9" * 400, None, True),
        (b"2147483648", None, True),
        (b"2147483647", 2**31 - 1, False),
        (b"-2147483648", -(2**31), False),
        (b"-5", -5, False),
        (b"seven", None, True),
    ],
)
def test_integers_fit_the_32_bit_index_columns_or_are_dropped(
    tmp_path: Path, value: bytes, number: int | None, unusable: bool
) -> None:
    ds = dataset()
    _set_raw(ds, "InstanceNumber", "IS", value + b" " * (len(value) % 2))

    header = _accepted(tmp_path, save(ds))

    assert header.instance_number == number
    assert header.unusable == (("InstanceNumber",) if unusable else ())
    assert header.series_number == 1


@pytest.mark.parametrize(("vr", "value"), [(b"AO", b"CT Thorax "), (b"FD", b"CT Thorax ")])
def test_a_value_labelled_with_a_wrong_vr_is_read_as_the_dictionary_says(
    tmp_path: Path, vr: bytes, value: bytes
) -> None:
    # An unknown VR made pydicom raise NotImplementedError; a binary one would misread text.
    ds = dataset()
    ds.StudyDescription = value.decode()
    data = save(ds).replace(b"\x08\x00\x30\x10LO", b"\x08\x00\x30\x10" + vr)

    assert _accepted(tmp_path, data).study_description == "CT Thorax"


# ---- 3. hostile structure --------------------------------------------------------------------


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
def test_sequences_nested_600_deep_are_refused_without_recursion(
    tmp_path: Path, implicit: bool
) -> None:
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    data = save(dataset(), syntax)
    deep = insert_before_pixel_data(data, nested(600, implicit=implicit), implicit=implicit)

    refused = _refused(tmp_path, deep)

    assert refused.reason == "too-deeply-nested"
    assert "64" in str(refused)


def test_nesting_up_to_the_limit_is_accepted(tmp_path: Path) -> None:
    data = insert_before_pixel_data(save(dataset()), nested(64))

    assert _accepted(tmp_path, data).rows == 64


def test_a_deflated_data_set_of_garbage_is_unreadable(tmp_path: Path) -> None:
    garbage = np.random.default_rng(3).bytes(5000)

    refused = _refused(tmp_path, part10(garbage, DeflatedExplicitVRLittleEndian))

    assert refused.reason == "unreadable"
    assert "deflated" in str(refused)


@pytest.mark.parametrize("cut", [1, 20, 500])
def test_a_deflated_data_set_cut_short_is_truncated(tmp_path: Path, cut: int) -> None:
    data = deflate(save(dataset(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))))
    assert _accepted(tmp_path, data).rows == 64

    assert _refused(tmp_path, data[:-cut]).reason == "truncated"


# ---- 4. decompression bomb -------------------------------------------------------------------


def _bomb(body: bytes, zeros: int, tail: bytes = b"") -> bytes:
    """A deflated file: ``body``, then ``zeros`` MiB of zero bytes (about 1 KiB deflated per
    MiB), then ``tail``. Each MiB is one full-flush block, so one block serves for all."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = compressor.compress(body) + compressor.flush(zlib.Z_FULL_FLUSH)
    mib = compressor.compress(bytes(2**20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert zlib.decompressobj(-zlib.MAX_WBITS).decompress(mib) == bytes(2**20)
    end = compressor.compress(tail) + compressor.flush()
    return part10(head + mib * zeros + end, DeflatedExplicitVRLittleEndian)


def _pixel_data_header(length: int) -> bytes:
    return element(0x7FE00010, b"OW", b"", length=length)


def _bombs() -> dict[str, tuple[bytes, int, str]]:
    """Deflated files of about 1 MiB that inflate to 1 GiB: (file, max_pixels, reason)."""
    data = save(dataset())
    body = data[meta_end(data) :]
    header = body[: body.index(b"\xe0\x7f\x10\x00OW")]
    trailing_padding = element(0xFFFCFFFC, b"OB", b"", length=2**30)
    huge = dataset()
    huge.Rows = huge.Columns = 16384
    huge.NumberOfFrames = 2
    huge_data = save(huge)
    huge_header = huge_data[meta_end(huge_data) :]
    huge_header = huge_header[: huge_header.index(b"\xe0\x7f\x10\x00OW")]
    return {
        # 1 GiB of Data Set Trailing Padding after a small image.
        "padding": (_bomb(body + trailing_padding, 1024), LIMIT, "too-large"),
        # 1 GiB of pixel data that a 16384 x 16384 x 2 header announces, over the limit.
        "big-image": (_bomb(huge_header + _pixel_data_header(2**30), 1024), 10**8, "too-large"),
        # 1 GiB of pixel data under a 64 x 64 header.
        "lying-header": (
            _bomb(header + _pixel_data_header(2**30), 1024),
            LIMIT,
            "pixel-data-mismatch",
        ),
    }


@pytest.mark.parametrize("kind", ["padding", "big-image", "lying-header"])
def test_a_decompression_bomb_is_refused_in_bounded_memory(tmp_path: Path, kind: str) -> None:
    data, max_pixels, reason = _bombs()[kind]
    assert len(data) < 2 * 2**20
    path = tmp_path / "bomb.dcm"
    path.write_bytes(data)

    tracemalloc.start()
    try:
        with pytest.raises(InvalidInstance) as refused:
            read_header(path, max_pixels)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert refused.value.reason == reason
    assert peak < 5 * 2**20


def test_a_big_deflated_image_within_the_limits_is_accepted(tmp_path: Path) -> None:
    # 16 frames of 512 x 512 (8 MiB inflated) is no bomb: streamed through, never held.
    frames = np.zeros((16, 512, 512), np.uint16)
    path = tmp_path / "big.dcm"
    path.write_bytes(deflate(save(dataset(frames))))

    tracemalloc.start()
    try:
        header = read_header(path, LIMIT, digest=lambda: "x")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert (header.frames, header.rows) == (16, 512)
    assert peak < 2 * 2**20


# ---- 5. headers that contradict the pixel data -----------------------------------------------


def _native(change: str) -> tuple[bytes, str]:
    """A 64 x 64 16-bit instance spoilt one way; the reason it must be refused with."""
    ds = dataset()
    pixels = ds.PixelData
    reason = "bad-dimensions"
    if change in ("half", "twice", "empty"):
        ds.PixelData = {"half": pixels[: len(pixels) // 2], "twice": pixels * 2, "empty": b""}[
            change
        ]
        reason = "pixel-data-mismatch"
    elif change.startswith("frames="):
        _set_raw(ds, "NumberOfFrames", "IS", change.removeprefix("frames=").encode())
    elif change.startswith("bits="):
        ds.BitsAllocated = int(change.removeprefix("bits="))
    elif change.startswith("samples="):
        ds.SamplesPerPixel = int(change.removeprefix("samples="))
    elif change == "float-16-bits":
        del ds.PixelData
        ds.FloatPixelData = np.zeros(64 * 64 // 2, np.float32).tobytes()
    elif change == "no-bits":
        del ds.BitsAllocated
    elif change == "two-pixel-elements":  # both right for 32 bits: but which is the image?
        ds.BitsAllocated = 32
        ds.PixelData = ds.FloatPixelData = np.zeros(64 * 64, np.float32).tobytes()
        reason = "pixel-data-mismatch"
    return save(ds), reason


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
@pytest.mark.parametrize(
    "change",
    [
        "half",
        "twice",
        "empty",
        "frames=-5",
        "frames=0 ",
        "frames=x ",
        "bits=0",
        "bits=12",
        "no-bits",
        "samples=2",
        "samples=4",
        "float-16-bits",
        "two-pixel-elements",
    ],
)
def test_native_pixel_data_must_be_what_the_header_says(tmp_path: Path, change: str) -> None:
    data, reason = _native(change)

    assert _refused(tmp_path, data).reason == reason


@pytest.mark.parametrize(
    ("rows", "columns", "frames", "samples", "photometric", "length"),
    [
        (3, 3, 1, 1, "MONOCHROME2", 9),  # written with a padding byte: 10 on disk
        (5, 5, 2, 3, "RGB", 150),
        (4, 4, 1, 3, "YBR_FULL_422", 32),  # two chroma samples for two pixels: not 48
    ],
)
def test_native_pixel_data_of_the_right_length_is_accepted(
    tmp_path: Path,
    rows: int,
    columns: int,
    frames: int,
    samples: int,
    photometric: str,
    length: int,
) -> None:
    ds = dataset()
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, samples
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = bytes(length)
    ds["PixelData"].VR = "OB"

    header = _accepted(tmp_path, save(ds))

    assert (header.rows, header.columns, header.frames) == (rows, columns, frames)


def test_a_jpeg_instance_is_accepted(tmp_path: Path) -> None:
    assert _accepted(tmp_path, save(jpeg(3), JPEGBaseline8Bit)).frames == 3


def _body(data: bytes) -> bytes:
    return data[meta_end(data) :]


def test_native_pixel_data_labelled_jpeg_is_refused(tmp_path: Path) -> None:
    refused = _refused(tmp_path, part10(_body(save(dataset())), JPEGBaseline8Bit))

    assert refused.reason == "pixel-data-mismatch"
    assert "mislabels its transfer syntax" in str(refused)


def test_jpeg_fragments_labelled_uncompressed_are_refused(tmp_path: Path) -> None:
    data = part10(_body(save(jpeg(1), JPEGBaseline8Bit)), ExplicitVRLittleEndian)

    assert _refused(tmp_path, data).reason == "pixel-data-mismatch"


def test_fewer_fragments_than_frames_are_refused(tmp_path: Path) -> None:
    ds = jpeg(3)
    ds.NumberOfFrames = 4

    refused = _refused(tmp_path, save(ds, JPEGBaseline8Bit))

    assert refused.reason == "pixel-data-mismatch"
    assert "3 fragment(s) for 4 frame(s)" in str(refused)


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        ("tag", "unreadable"),  # not an item tag
        ("undefined-length", "unreadable"),  # a fragment's length is always defined
        ("short-length", "unreadable"),  # the next "item" is in the middle of the JPEG data
        ("long-length", "truncated"),  # beyond the end of the file
    ],
)
def test_scrambled_fragment_items_are_refused(tmp_path: Path, spoil: str, reason: str) -> None:
    data = save(jpeg(2), JPEGBaseline8Bit)
    first = data.index(b"\xfe\xff\x00\xe0")
    at = data.index(b"\xfe\xff\x00\xe0", first + 8)  # the first fragment's item
    header = {
        "tag": b"\x10\x00\x10\x00" + data[at + 4 : at + 8],
        "undefined-length": data[at : at + 4] + b"\xff\xff\xff\xff",
        "short-length": data[at : at + 4] + struct.pack("<L", 3),
        "long-length": data[at : at + 4] + struct.pack("<L", 10**8),
    }[spoil]

    assert _refused(tmp_path, data[:at] + header + data[at + 8 :]).reason == reason


@pytest.mark.parametrize("uid", ["1.2.03.4", "01.2.3", "1.2.840.0010", "1.2." + "3" * 70])
def test_uids_with_leading_zeros_or_too_long_are_refused(tmp_path: Path, uid: str) -> None:
    ds = dataset()
    ds.SeriesInstanceUID = uid

    refused = _refused(tmp_path, save(ds))

    assert refused.reason == "invalid-uid"
    assert "SeriesInstanceUID" in str(refused)


def test_a_zero_uid_component_is_valid(tmp_path: Path) -> None:
    ds = dataset()
    ds.SeriesInstanceUID = "1.2.0.40.0"

    assert _accepted(tmp_path, save(ds)).series_uid == "1.2.0.40.0"
