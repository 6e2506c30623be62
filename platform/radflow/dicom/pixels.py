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
    return _grey(pydicom.dcmread(io.BytesIO(dicom_bytes)))


def _grey(ds: pydicom.Dataset) -> np.ndarray:
    arr = apply_rescale(ds.pixel_array, ds).astype(np.float32)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        arr = arr.max() - arr + arr.min()
    return arr


def to_image(dicom_bytes: bytes) -> np.ndarray:
    """One 2D image: (rows, cols) grey-scale or (rows, cols, 3) colour, float32.

    A multi-frame grey-scale instance gives its middle frame (a colour one likewise).
    """
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes))
    colour = int(ds.get("SamplesPerPixel", 1)) == 3
    arr = ds.pixel_array.astype(np.float32) if colour else _grey(ds)
    frames = arr.ndim == (4 if colour else 3)
    return arr[arr.shape[0] // 2] if frames else arr
