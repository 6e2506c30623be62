"""Decoding pixel data into arrays in physical units (modality rescale applied)."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.pixels.processing import apply_rescale


def to_array(dicom_bytes: bytes) -> np.ndarray:
    """Float32 pixels after the modality LUT; MONOCHROME1 flipped so bright means dense.

    Shape is (rows, cols) for one frame, (frames, rows, cols) for multi-frame data.
    """
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes))
    arr = apply_rescale(ds.pixel_array, ds).astype(np.float32)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        arr = arr.max() - arr + arr.min()
    return arr
