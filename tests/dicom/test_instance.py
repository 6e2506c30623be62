"""read_header: the values the index gets from a received file, and what it refuses.

read_header reads the usual values straight from pydicom's raw elements and leaves the rest to
pydicom's own conversion; these tests pin the cases where the two could part: character sets,
padding, several values, byte order, and pixel data cut short or too big to load.
"""

from __future__ import annotations

import hashlib
import io
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from factories import dicom_bytes
from pydicom.charset import python_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from radflow.dicom.instance import read_header
from radflow.errors import InvalidInstance

LIMIT = 10**9


def _dataset(pixels: np.ndarray | None = None) -> Dataset:
    return pydicom.dcmread(io.BytesIO(dicom_bytes(pixels)))


def _save(ds: Dataset, path: Path, syntax: str = ExplicitVRLittleEndian) -> Path:
    if syntax == ExplicitVRBigEndian:
        # pydicom will not turn a dataset read as little endian into big endian: copy it over.
        fresh = Dataset()
        for element in ds:
            fresh.add(element)
        fresh.file_meta = ds.file_meta
        ds = fresh
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    return path


def _set_raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> None:
    """Store ``value`` byte for byte, padding and all, as a sender could have."""
    tag = Tag(keyword)
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _with_charset(data: bytes, charset: bytes) -> bytes:
    """``data`` (Explicit VR Little Endian, no SpecificCharacterSet) with one spliced in.

    Spliced as bytes because pydicom will not write some values a sender may: a bare code
    extension, or a Python codec name, which pydicom still honours when reading.
    """
    (meta_length,) = struct.unpack_from("<I", data, 140)
    start = 144 + meta_length  # preamble, DICM, group length element, then the rest of the meta
    group, element = struct.unpack_from("<HH", data, start)
    assert (group, element) > (0x0008, 0x0005)  # so it goes first
    value = charset + b" " * (len(charset) % 2)
    spliced = struct.pack("<HH2sH", 0x0008, 0x0005, b"CS", len(value)) + value
    return data[:start] + spliced + data[start:]


def test_header_values(tmp_path: Path) -> None:
    ds = _dataset(np.zeros((48, 64), np.uint16))
    ds.StudyDescription = "CT Thorax"
    ds.SeriesDescription = "Axial 1.0"
    ds.BodyPartExamined = "CHEST"
    ds.AccessionNumber = "ACC-7"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SeriesNumber, ds.InstanceNumber = 3, 12
    path = _save(ds, tmp_path / "a.dcm")

    header = read_header(path, LIMIT)

    assert (header.rows, header.columns, header.frames) == (48, 64, 1)
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.sop_class_uid == ds.SOPClassUID
    assert (header.study_uid, header.series_uid) == (ds.StudyInstanceUID, ds.SeriesInstanceUID)
    assert header.transfer_syntax_uid == ExplicitVRLittleEndian
    assert (header.patient_id, header.accession_number) == ("TEST-PATIENT", "ACC-7")
    assert (header.study_date, header.modality, header.body_part) == ("20240101", "CR", "CHEST")
    assert (header.study_description, header.series_description) == ("CT Thorax", "Axial 1.0")
    assert (header.series_number, header.instance_number) == (3, 12)
    assert header.image_type == "ORIGINAL\\PRIMARY\\AXIAL"
    data = path.read_bytes()
    assert header.size_bytes == len(data)
    assert header.sha256 == hashlib.sha256(data).hexdigest()
    assert read_header(path, LIMIT, digest=lambda: "given").sha256 == "given"


@pytest.mark.parametrize(
    "syntax",
    [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian, RLELossless],
)
def test_same_values_in_every_byte_order_and_encoding(tmp_path: Path, syntax: str) -> None:
    # 48 x 64 and 3 frames: a value read in the wrong byte order (0x3000 for 48) shows.
    ds = _dataset((np.arange(3 * 48 * 64) % 4096).astype(np.uint16).reshape(3, 48, 64))
    reference = read_header(_save(ds, tmp_path / "explicit.dcm"), LIMIT)
    if syntax == RLELossless:
        ds.compress(RLELossless, generate_instance_uid=False)

    header = read_header(_save(ds, tmp_path / "other.dcm", syntax), LIMIT)

    assert (header.rows, header.columns, header.frames) == (48, 64, 3)
    assert header.transfer_syntax_uid == syntax
    differs = ("transfer_syntax_uid", "size_bytes", "sha256")
    assert {k: v for k, v in vars(header).items() if k not in differs} == {
        k: v for k, v in vars(reference).items() if k not in differs
    }


@pytest.mark.parametrize(
    ("charset", "text"),
    [
        ("ISO_IR 100", "Thorax nativ Müller"),
        ("ISO_IR 192", "Thorax – Übersicht 胸部"),
        (["", "ISO 2022 IR 87"], "胸部 CT"),
        ("GB18030", "胸部平扫"),
    ],
)
def test_text_is_decoded_in_its_character_set(
    tmp_path: Path, charset: str | list[str], text: str
) -> None:
    ds = _dataset()
    ds.SpecificCharacterSet = charset
    ds.StudyDescription = ds.SeriesDescription = ds.PatientID = text
    path = _save(ds, tmp_path / "a.dcm")

    header = read_header(path, LIMIT)

    assert header.study_description == header.series_description == header.patient_id == text


@pytest.mark.parametrize("charset", sorted(python_encoding))
def test_ascii_text_reads_the_same_in_every_dicom_character_set(
    tmp_path: Path, charset: str
) -> None:
    # read_header takes printable ASCII as is without asking pydicom: true for every defined term.
    ds = _dataset()
    ds.StudyDescription = "CT Chest w/o contrast ~ (1.0)"
    ds.PatientID = " PID-1"
    path = tmp_path / "a.dcm"
    path.write_bytes(_with_charset(_bytes(ds), charset.encode("ascii")))
    by_pydicom = pydicom.dcmread(path)

    header = read_header(path, LIMIT)

    assert header.study_description == by_pydicom.StudyDescription == ds.StudyDescription
    assert header.patient_id == by_pydicom.PatientID == " PID-1"


def test_ascii_bytes_under_a_python_codec_charset_are_decoded_as_pydicom_does(
    tmp_path: Path,
) -> None:
    # Not a DICOM term, but pydicom honours any Python codec name: cp037 is EBCDIC.
    ds = _dataset()
    ds.StudyDescription = "lower case"
    path = tmp_path / "a.dcm"
    path.write_bytes(_with_charset(_bytes(ds), b"cp037"))

    header = read_header(path, LIMIT)

    assert header.study_description == pydicom.dcmread(path).StudyDescription.strip()
    assert header.study_description != "lower case"


def test_uids_lose_their_padding(tmp_path: Path) -> None:
    ds = _dataset()
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"  # odd length: written with a NUL pad
    _set_raw(ds, "SeriesInstanceUID", "UI", b"1.2.3.4 ")
    _set_raw(ds, "StudyInstanceUID", "UI", b" 1.2.3.5\0\0")
    path = _save(ds, tmp_path / "a.dcm")
    assert b"1.2.826.0.1.3680043.8.498.1\0" in path.read_bytes()

    header = read_header(path, LIMIT)

    assert header.sop_instance_uid == "1.2.826.0.1.3680043.8.498.1"
    assert (header.series_uid, header.study_uid) == ("1.2.3.4", "1.2.3.5")


@pytest.mark.parametrize(
    ("value", "reason"),
    [(b"", "missing-uid"), (b"\0\0", "missing-uid"), (b"1.2.3\\1.2.4\0", "invalid-uid")],
)
def test_unusable_uids_are_refused(tmp_path: Path, value: bytes, reason: str) -> None:
    ds = _dataset()
    _set_raw(ds, "SeriesInstanceUID", "UI", value)
    path = _save(ds, tmp_path / "a.dcm")

    with pytest.raises(InvalidInstance) as refused:
        read_header(path, LIMIT)

    assert refused.value.reason == reason
    assert "SeriesInstanceUID" in str(refused.value)


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")  # pydicom's, on the bad ones
@pytest.mark.parametrize(
    ("value", "number"),
    [(b"12", 12), (b"012 ", 12), (b" 7", 7), (b"+3", 3), (b"1.0 ", 1), (b"", None), (b"ab", None)],
)
def test_integer_strings(tmp_path: Path, value: bytes, number: int | None) -> None:
    ds = _dataset()
    _set_raw(ds, "SeriesNumber", "IS", value)
    path = _save(ds, tmp_path / "a.dcm")

    assert read_header(path, LIMIT).series_number == number


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
@pytest.mark.parametrize(("value", "frames"), [(b"4 ", 4), (b"", 1), (b"2.0 ", 2), (b"+3", 3)])
def test_number_of_frames(tmp_path: Path, value: bytes, frames: int) -> None:
    ds = _dataset(np.zeros((frames, 64, 64), np.uint16))
    _set_raw(ds, "NumberOfFrames", "IS", value)
    path = _save(ds, tmp_path / "a.dcm")

    assert read_header(path, LIMIT).frames == frames


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
@pytest.mark.parametrize(
    ("keyword", "vr", "value"),
    [
        ("NumberOfFrames", "IS", b"abc "),
        ("NumberOfFrames", "IS", b"2\\3 "),
        ("NumberOfFrames", "IS", b"0 "),
        ("Rows", "US", b"\x01\x00\x02\x00"),
    ],
)
def test_dimensions_that_are_not_one_number_are_refused(
    tmp_path: Path, keyword: str, vr: str, value: bytes
) -> None:
    ds = _dataset()
    _set_raw(ds, keyword, vr, value)
    path = _save(ds, tmp_path / "a.dcm")

    with pytest.raises(InvalidInstance) as refused:
        read_header(path, LIMIT)
    assert refused.value.reason == "bad-dimensions"


def test_text_is_trimmed_and_cut_to_the_column_size(tmp_path: Path) -> None:
    ds = _dataset()
    _set_raw(ds, "StudyDescription", "LO", b"  " + b"x" * 70)
    _set_raw(ds, "PatientID", "LO", b" PID \0")
    _set_raw(ds, "ImageType", "CS", b"original\\ primary \\AXIAL ")
    _set_raw(ds, "BodyPartExamined", "CS", b"  ")
    _set_raw(ds, "SeriesDescription", "LO", b"two\\values")
    path = _save(ds, tmp_path / "a.dcm")

    header = read_header(path, LIMIT)

    assert header.study_description == "x" * 64
    assert header.patient_id == " PID"  # as pydicom gives it: trailing padding only
    assert header.image_type == "ORIGINAL\\PRIMARY\\AXIAL"
    assert header.body_part is None
    # Several values: joined by backslashes as the file holds them, never a Python list repr.
    assert header.series_description == "two\\values"


@pytest.mark.parametrize(
    ("keyword", "vr", "value", "stored"),
    [
        ("AccessionNumber", "SH", b"%_%\\", "%_%\\"),
        ("PatientID", "LO", b"\\A\\\\B ", "\\A\\\\B"),
        ("StudyDescription", "LO", b"CHEST\\PA", "CHEST\\PA"),
    ],
)
def test_a_backslash_in_a_text_value_is_stored_as_the_sender_wrote_it(
    tmp_path: Path, keyword: str, vr: str, value: bytes, stored: str
) -> None:
    """pydicom splits at every backslash; the header joins the pieces again (issue 16)."""
    ds = _dataset()
    _set_raw(ds, keyword, vr, value)
    header = read_header(_save(ds, tmp_path / "a.dcm"), LIMIT)
    field = {"AccessionNumber": "accession_number", "PatientID": "patient_id"}
    assert getattr(header, field.get(keyword, "study_description")) == stored


def test_float_pixel_data_counts_as_pixel_data(tmp_path: Path) -> None:
    ds = _dataset()
    del ds.PixelData
    ds.FloatPixelData = np.zeros(64 * 64, np.float32).tobytes()
    ds.BitsAllocated = 32
    path = _save(ds, tmp_path / "a.dcm")

    assert read_header(path, LIMIT).rows == 64
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(InvalidInstance, match="cut short") as refused:
        read_header(path, LIMIT)
    assert refused.value.reason == "truncated"


def _big(tmp_path: Path) -> Path:
    """A 16-frame 512 x 512 file: 8 MB of pixel data, well past what pydicom reads eagerly."""
    frames = np.zeros((16, 512, 512), np.uint16)
    path = tmp_path / "big.dcm"
    path.write_bytes(dicom_bytes(frames))
    return path


def test_big_multiframe_is_checked_without_loading_its_pixels(tmp_path: Path) -> None:
    path = _big(tmp_path)

    tracemalloc.start()
    try:
        header = read_header(path, LIMIT, digest=lambda: "x")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert (header.rows, header.columns, header.frames) == (512, 512, 16)
    assert peak < 1_000_000


@pytest.mark.parametrize("cut", [1, 1000, 4 * 1024 * 1024])
def test_pixel_data_cut_short_is_refused_whatever_its_size(tmp_path: Path, cut: int) -> None:
    path = _big(tmp_path)
    path.write_bytes(path.read_bytes()[:-cut])

    with pytest.raises(InvalidInstance, match="cut short") as refused:
        read_header(path, LIMIT)

    assert refused.value.reason == "truncated"


def _encapsulated(tmp_path: Path, trailing: bytes | None = None) -> Path:
    """A 2-frame RLE file (~30 KB of fragments); ``trailing``: Data Set Trailing Padding after
    the pixel data."""
    noise = np.random.default_rng(0).integers(0, 4096, (2, 64, 64), dtype=np.uint16)
    ds = _dataset(noise)
    ds.compress(RLELossless, generate_instance_uid=False)
    if trailing is not None:
        ds.add_new(0xFFFCFFFC, "OB", trailing)
    return _save(ds, tmp_path / "a.dcm", RLELossless)


# 1 and 4: in the delimiter (pydicom reads the file); 8 and more: pydicom finds no delimiter and
# keeps no element at all.
@pytest.mark.parametrize("cut", [1, 4, 8, 100, 1000])
def test_encapsulated_pixel_data_cut_short_is_refused_as_truncated(
    tmp_path: Path, cut: int
) -> None:
    path = _encapsulated(tmp_path)
    assert read_header(path, LIMIT).frames == 2
    path.write_bytes(path.read_bytes()[:-cut])

    with pytest.raises(InvalidInstance) as refused:
        read_header(path, LIMIT)

    assert refused.value.reason == "truncated"


def test_elements_after_encapsulated_pixel_data_are_not_mistaken_for_a_cut(
    tmp_path: Path,
) -> None:
    path = _encapsulated(tmp_path, trailing=b"\0" * 64)
    assert 0xFFFCFFFC in pydicom.dcmread(path)

    assert read_header(path, LIMIT).frames == 2


def test_a_malformed_fragment_item_is_refused(tmp_path: Path) -> None:
    path = _encapsulated(tmp_path, trailing=b"\0" * 64)
    data = path.read_bytes()
    # The second item header (the first fragment's) turned into something else.
    first = data.index(b"\xfe\xff\x00\xe0")
    second = data.index(b"\xfe\xff\x00\xe0", first + 8)
    path.write_bytes(data[:second] + b"\x10\x00\x10\x00" + data[second + 4 :])

    with pytest.raises(InvalidInstance, match="malformed fragment item") as refused:
        read_header(path, LIMIT)

    # Not cut short: corrupt.
    assert refused.value.reason == "unreadable"
