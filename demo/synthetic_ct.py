"""A synthetic CT series: a torso-like phantom in Hounsfield units, written as CT Image files.

For the viewer's tests and benchmark, which need a series that packs and scrolls like a real CT
(air around the body, soft tissue, lungs, a spine, a tumour-like blob, and scanner noise, which is
what makes a real CT compress only about twofold), without patient data. Deterministic for a seed.

For the 3D segmentation task (ct-lesions): :func:`lesion_case` puts ellipsoids of raised
attenuation in the soft tissue of the phantom (without its blob) and gives their mask, the
ground truth, alongside; :func:`write_lesion_dataset` writes cases as a dataset folder
(``dataset.json``: each case's series folder and its NIfTI mask) for
``radflow import segmentation DIR --task ct-lesions``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.uid import generate_uid

from radflow.dicom.writer import CTSeriesBuilder

LESION_HU = 100.0
"""How much brighter a lesion is than the soft tissue it lies in (an enhancing lesion)."""
SPACING = (1.0, 0.7, 0.7)
"""(between slices, rows, columns) in mm of every series written here."""

NOISE_HU = 12.0
"""Standard deviation of the noise added everywhere (a typical abdominal CT's, in HU)."""


def ct_phantom(
    rng: np.random.Generator, slices: int, size: int, *, blob: bool = True
) -> np.ndarray:
    """(slices, size, size) int16 Hounsfield units, slice 0 at the feet end; ``blob``: with
    the tumour-like blob (a lesion nobody labelled, for a segmentation task)."""
    y, x = (np.mgrid[0:size, 0:size] - size / 2) / (size / 2)
    body = (x / 0.85) ** 2 + (y / 0.62) ** 2 <= 1
    spine = (x / 0.1) ** 2 + ((y - 0.42) / 0.1) ** 2 <= 1
    out = np.empty((slices, size, size), dtype=np.int16)
    for i in range(slices):
        t = i / max(slices - 1, 1)  # lungs grow toward the head end
        lungs = ((np.abs(x) - 0.4) / 0.28) ** 2 + ((y + 0.05) / 0.45) ** 2 <= max(0.0, t - 0.3)
        tumour = ((x + 0.2) ** 2 + (y - 0.1) ** 2) <= 0.015 * np.exp(-(((t - 0.5) / 0.1) ** 2))
        hu = np.full((size, size), -1000.0)
        hu[body] = 40.0
        hu[lungs & body] = -850.0
        hu[spine] = 700.0
        if blob:
            hu[tumour] = 90.0
        hu += rng.normal(0.0, NOISE_HU, (size, size))
        out[i] = np.clip(np.rint(hu), -1024, 3071)
    return out


def write_ct_series(
    folder: Path,
    hu: np.ndarray,
    *,
    spacing: tuple[float, float, float] = SPACING,
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


def lesion_case(
    rng: np.random.Generator,
    slices: int,
    size: int,
    *,
    lesions: tuple[int, int] = (1, 3),
    radius: tuple[float, float] = (2.5, 6.0),
) -> tuple[np.ndarray, np.ndarray]:
    """A phantom with ``lesions`` (a range) ellipsoids of raised HU in its soft tissue, radii
    in ``radius`` voxels (a range, per axis): (HU int16, mask bool), both (slices, size, size)."""
    hu = ct_phantom(rng, slices, size, blob=False)
    tissue = (hu > -100) & (hu < 200)
    inside = np.argwhere(tissue[:: max(1, slices // 16)])  # a sample of the soft tissue
    inside[:, 0] *= max(1, slices // 16)
    mask = np.zeros(hu.shape, dtype=bool)
    for _ in range(int(rng.integers(lesions[0], lesions[1] + 1))):
        radii = rng.uniform(*radius, size=3)
        centre = inside[rng.integers(len(inside))]
        # Drawn in its bounding box: a grid over a whole 512x512x200 CT would take gigabytes.
        low = np.maximum(np.floor(centre - radii).astype(int), 0)
        high = np.minimum(np.ceil(centre + radii).astype(int) + 1, hu.shape)
        z, y, x = np.ogrid[low[0] : high[0], low[1] : high[1], low[2] : high[2]]
        box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
        mask[box] |= (
            ((z - centre[0]) / radii[0]) ** 2
            + ((y - centre[1]) / radii[1]) ** 2
            + ((x - centre[2]) / radii[2]) ** 2
        ) <= 1.0
    mask &= tissue
    hu[mask] = np.clip(hu[mask] + LESION_HU, -1024, 3071)
    return hu, mask


def mask_nifti(mask: np.ndarray, affine: np.ndarray) -> bytes:
    """A (slices, rows, columns) mask of a series placed by ``affine`` (voxel index to LPS mm)
    as ITK and MONAI write it: a gzipped NIfTI-1, axes (columns, rows, slices), RAS affine."""
    to_ijk = np.zeros((4, 4))
    to_ijk[0, 2] = to_ijk[1, 1] = to_ijk[2, 0] = to_ijk[3, 3] = 1.0  # (i, j, k) -> (k, j, i)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine @ to_ijk
    image = nib.Nifti1Image(np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.uint8), ras)
    return gzip.compress(image.to_bytes())


def write_lesion_dataset(
    folder: Path, cases: int, *, slices: int = 32, size: int = 32, seed: int = 0
) -> list[np.ndarray]:
    """``cases`` lesion cases in ``folder``: ``caseNNN/`` (the series' files),
    ``caseNNN.nii.gz`` (the mask) and ``dataset.json`` naming them (a ``training`` list); each
    case a patient of its own. The masks, (slices, rows, columns) in slice order."""
    rng = np.random.default_rng(seed)
    entries, masks = [], []
    for i in range(cases):
        hu, mask = lesion_case(rng, slices, size)
        write_ct_series(folder / f"case{i:03d}", hu, patient_id=f"SYN-LESION-{seed}-{i}")
        # Slice i at z = i mm, rows along y (0.7 mm), columns along x (0.7 mm): the LPS affine
        # of the written series, as radflow.dicom.volume places it.
        affine = np.array(
            [[0, 0, SPACING[2], 0], [0, SPACING[1], 0, 0], [SPACING[0], 0, 0, 0], [0, 0, 0, 1]]
        )
        (folder / f"case{i:03d}.nii.gz").write_bytes(mask_nifti(mask, affine))
        entries.append({"image": f"case{i:03d}", "label": f"case{i:03d}.nii.gz"})
        masks.append(mask)
    (folder / "dataset.json").write_text(json.dumps({"name": "lesions", "training": entries}))
    return masks
