"""Property: whatever bytes arrive, read_header returns a header or refuses with a known reason.

Hypothesis starts from valid instances (explicit and implicit VR, big endian, RLE and JPEG
fragments, deflated, with sequences of defined and undefined length) and spoils them the ways
transfers and senders do (tests/spoil.py): bytes flipped, cut, inserted or deleted, values
and length fields rewritten, sequences nested hundreds deep, the transfer syntax claimed wrongly.
Nothing but InvalidInstance may come out (no struct.error, zlib.error, RecursionError,
OverflowError, NotImplementedError...), each example in bounded time, and an accepted header's
values must fit the index.

In ``make test`` it runs 300 examples from a fixed seed (reproducible in CI). To hunt for more,
locally, with a fresh seed each run:

    RADFLOW_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/dicom/test_instance_fuzz.py
"""

from __future__ import annotations

import os
import zlib
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from part10 import part10
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit
from spoil import bases, received

from radflow.dicom.instance import read_header
from radflow.errors import InvalidInstance
from radflow.ingest.receiver.statuses import FAILURE_STATUS
from radflow.settings import Settings

EXAMPLES = int(os.environ.get("RADFLOW_FUZZ_EXAMPLES", "300"))
CI = "RADFLOW_FUZZ_EXAMPLES" not in os.environ
KNOWN_REASONS = frozenset(FAILURE_STATUS)
MAX_PIXELS = Settings().max_pixels
INT32 = range(-(2**31), 2**31)


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
