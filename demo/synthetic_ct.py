"""A synthetic CT series: a torso-like phantom in Hounsfield units, written as CT Image files.

For the viewer's tests and benchmark, which need a series that packs and scrolls like a real CT
(air around the body, soft tissue, lungs, a spine, a tumour-like blob, and scanner noise, which is
what makes a real CT compress only about twofold), without patient data. Deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from radflow.dicom.writer import CTSeriesBuilder

NOISE_HU = 12.0
"""Standard deviation of the noise added everywhere (a typical abdominal CT's, in HU)."""


def ct_phantom(rng: np.random.Generator, slices: int, size: int) -> np.ndarray:
    """(slices, size, size) int16 Hounsfield units, slice 0 at the feet end."""
    y, x = (np.mgrid[0:size, 0:size] - size / 2) / (size / 2)
    body = (x / 0.85) ** 2 + (y / 0.62) ** 2 <= 1
    spine = (x / 0.1) ** 2 + ((y - 0.42) / 0.1) ** 2 <= 1
    out = np.empty((slices, size, size), dtype=np.int16)
    for i in range(slices):
        t = i / max(slices - 1, 1)  # lungs grow toward the head end
        lungs = ((np.abs(x) - 0.4) / 0.28) ** 2 + ((y + 0.05) / 0.45) ** 2 <= max(0.0, t - 0.3)
        blob = ((x + 0.2) ** 2 + (y - 0.1) ** 2) <= 0.015 * np.exp(-(((t - 0.5) / 0.1) ** 2))
        hu = np.full((size, size), -1000.0)
        hu[body] = 40.0
        hu[lungs & body] = -850.0
        hu[spine] = 700.0
        hu[blob] = 90.0
        hu += rng.normal(0.0, NOISE_HU, (size, size))
        out[i] = np.clip(np.rint(hu), -1024, 3071)
    return out


def write_ct_series(
    folder: Path,
    hu: np.ndarray,
    *,
    spacing: tuple[float, float, float] = (1.0, 0.7, 0.7),
    patient_id: str = "SYN-CT",
    accession: str = "",
) -> tuple[str, list[Path]]:
    """``hu`` (slices, rows, columns) as one axial CT series of files in ``folder``: its Study
    Instance UID and the files."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid()
    builder = CTSeriesBuilder(
        rows=hu.shape[1],
        columns=hu.shape[2],
        spacing=spacing,
        patient_id=patient_id,
        patient_name="Synthetic^CT",
        study_uid=study_uid,
        series_uid=generate_uid(),
        accession=accession,
    )
    paths = []
    for i, values in enumerate(hu):
        sop_uid = generate_uid()
        ds = builder.slice(i, values.astype(np.float32), sop_instance_uid=sop_uid)
        path = folder / f"{sop_uid}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return study_uid, paths
