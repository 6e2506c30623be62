"""Ground-truth masks of segmentation tasks: stored objects that a label names.

A segmentation label's value is ``mask:<digest>``; the mask (and the region where it counts, a
field of view, when the dataset gives one) is stored under ``labels/<study>/<task>/`` as a
compressed npz named by the digest of its content. The same mask stored twice is one object and
one label value; a corrected mask is a new object and a new label.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from radflow.learning.tasks.base import MASK_PREFIX
from radflow.store import ObjectStore, keys

DIGEST_CHARS = 24


@dataclass(frozen=True)
class GroundTruth:
    """A study's mask: (rows, columns) for an image, (slices, rows, columns) for a series in
    stack order (radflow.dicom.geometry.SeriesPlan); ``region``: the pixels that count (None:
    all of them)."""

    mask: NDArray[np.bool_]
    region: NDArray[np.bool_] | None = None

    def __post_init__(self) -> None:
        if self.mask.ndim not in (2, 3):
            raise ValueError(
                f"a mask is (rows, cols) or (slices, rows, cols), not {self.mask.shape}"
            )
        if self.region is not None and self.region.shape != self.mask.shape:
            raise ValueError(
                f"the field of view {self.region.shape} and the mask {self.mask.shape} differ "
                "in size; give both for the same image"
            )

    def counted(self) -> NDArray[np.bool_]:
        return self.region if self.region is not None else np.ones_like(self.mask)


def _encode(truth: GroundTruth) -> bytes:
    buffer = io.BytesIO()
    shape = np.array(truth.mask.shape)
    if truth.region is None:
        np.savez_compressed(buffer, mask=np.packbits(truth.mask), shape=shape)
    else:
        np.savez_compressed(
            buffer, mask=np.packbits(truth.mask), shape=shape, region=np.packbits(truth.region)
        )
    return buffer.getvalue()


def _key(study_uid: str, task: str, value: str) -> str:
    if not value.startswith(MASK_PREFIX):
        raise ValueError(f"label value {value!r} names no stored mask")
    return keys.label(study_uid, task, f"mask.{value.removeprefix(MASK_PREFIX)}.npz")


def save_mask(store: ObjectStore, study_uid: str, task: str, truth: GroundTruth) -> str:
    """Store ``truth`` for the study; the label value that names it."""
    data = _encode(truth)
    value = MASK_PREFIX + hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]
    store.put_bytes(_key(study_uid, task, value), data, content_type="application/octet-stream")
    return value


def load_mask(store: ObjectStore, study_uid: str, task: str, value: str) -> GroundTruth:
    """The ground truth a label value names."""
    with np.load(io.BytesIO(store.get_bytes(_key(study_uid, task, value)))) as data:
        shape = tuple(int(n) for n in data["shape"])
        size = int(np.prod(shape))

        def unpack(name: str) -> NDArray[np.bool_]:
            return np.unpackbits(data[name])[:size].reshape(shape).astype(bool)

        return GroundTruth(unpack("mask"), unpack("region") if "region" in data else None)
