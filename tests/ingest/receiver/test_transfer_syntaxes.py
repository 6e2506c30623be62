"""Compressed transfer syntaxes arrive through storescu, are stored as sent, and decode later."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from factories import dicom_bytes, gradient
from peers import storescu, tool
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import Instance
from radflow.ingest.receiver import Receiver
from radflow.learning.preprocess import load_image
from radflow.store import ObjectStore

PIXELS = gradient(64, 64)


def _dcmtk(tool_name: str, *args: str | Path) -> None:
    subprocess.run([tool(f"/usr/bin/{tool_name}"), *map(str, args)], check=True, timeout=60)


def _pydicom(source: Path, target: Path, syntax: str) -> None:
    ds = pydicom.dcmread(source)
    ds.compress(syntax)
    ds.save_as(target, enforce_file_format=True)


def _eight_bit(path: Path) -> Path:
    """JPEG baseline holds 8-bit samples only."""
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes()))
    ds.set_pixel_data((PIXELS >> 4).astype(np.uint8), "MONOCHROME2", 8)
    ds.save_as(path, enforce_file_format=True)
    return path


# syntax -> (how to make it from an uncompressed file, storescu's option proposing it, lossless?)
MAKERS: dict[str, tuple[Callable[[Path, Path], None], str, bool]] = {
    JPEGBaseline8Bit: (lambda s, t: _dcmtk("dcmcjpeg", "+eb", _eight_bit(s), t), "-xy", False),
    JPEGExtended12Bit: (lambda s, t: _dcmtk("dcmcjpeg", "+ee", s, t), "-xx", False),
    JPEGLosslessSV1: (lambda s, t: _dcmtk("dcmcjpeg", "+e1", s, t), "-xs", True),
    JPEGLSLossless: (lambda s, t: _dcmtk("dcmcjpls", "+el", s, t), "-xt", True),
    JPEG2000Lossless: (lambda s, t: _pydicom(s, t, JPEG2000Lossless), "-xv", True),
    RLELossless: (lambda s, t: _pydicom(s, t, RLELossless), "-xr", True),
    DeflatedExplicitVRLittleEndian: (lambda s, t: _dcmtk("dcmconv", "+td", s, t), "-xd", True),
}


@pytest.mark.parametrize("settings", ["sqlite-local"], indirect=True)
def test_compressed_syntaxes_are_stored_and_decode(
    receiver: Receiver,
    tmp_path: Path,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
) -> None:
    files: dict[str, Path] = {}
    for syntax, (make, _, _) in MAKERS.items():
        source = tmp_path / f"plain-{syntax}.dcm"
        source.write_bytes(dicom_bytes(PIXELS))
        files[syntax] = tmp_path / f"{syntax}.dcm"
        make(source, files[syntax])
        assert pydicom.dcmread(files[syntax]).file_meta.TransferSyntaxUID == syntax

    for syntax, (_, propose, _) in MAKERS.items():
        # Proposed as the only syntax: storescu must send the file as it is, never decompressed.
        result = storescu(receiver.port, [files[syntax]], propose, "-R")
        assert result.returncode == 0, (syntax, result.stderr)
    assert receiver.wait_indexed(60)

    with session_factory() as session:
        stored = {i.transfer_syntax_uid: i for i in session.scalars(select(Instance))}
    assert stored.keys() == files.keys()
    for syntax, (_, _, lossless) in MAKERS.items():
        image = load_image(store, stored[syntax].object_key)
        assert image.shape == PIXELS.shape, syntax
        if lossless:
            np.testing.assert_array_equal(image, PIXELS, err_msg=syntax)
