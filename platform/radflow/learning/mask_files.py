"""Mask files as people give them: a picture, NIfTI or DICOM SEG, read and checked against
the image the mask is for.

The format is told by the content, not the file name: a DICOM file (the ``DICM`` preamble) must
be a Segmentation referencing the image by its SOP Instance UID (radflow.dicom.seg); NIfTI-1 or
NIfTI-2, plain or gzipped, is read with nibabel; anything else must be a lossless picture (PNG,
GIF, TIFF, BMP: a JPEG's compression noise turns a mask into speckle).

A mask holds two values at most: 0 for the background and one other value for the structure
(any value: 255 in a PNG, 1 in a NIfTI label map; a DICOM SEG is already binary, a FRACTIONAL
one counts from probability 0.5). Sizes are checked from the header before any pixel is
decoded, so a small file that declares a huge image costs nothing.

NIfTI stores the first axis along the image's columns (x) and the second along its rows (y), as
ITK, MONAI and dcm2niix write it: voxel (i, j) is column i of row j. Its affine is not applied
(a photograph has no patient orientation to match); singleton axes are dropped, so a 2D mask
may be (columns, rows) or (columns, rows, 1).

A volume's mask (a series assembled in stack order, radflow.dicom.geometry) is
(slices, rows, columns): a DICOM SEG over the series' instances, or a NIfTI whose affine says
where its voxels lie (sform or qform code set, RAS as NIfTI defines it): its axes are turned and
flipped onto the series' grid (nibabel.orientations; never resampled: a mask on another grid is
refused by its size). A NIfTI without an orientation is read as (columns, rows, slices), slices
in stack order.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import pydicom
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import apply_orientation, io_orientation, ornt_transform
from nibabel.spatialimages import HeaderDataError
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from radflow.dicom.seg import SegmentationError, read_segmentation
from radflow.errors import RadflowError

PICTURE_FORMATS = ("PNG", "GIF", "TIFF", "BMP")
FORMATS = "a PNG (or GIF, TIFF, BMP) picture, NIfTI (.nii, .nii.gz) or DICOM SEG"
_GZIP = b"\x1f\x8b"
_GREY_MODES = ("1", "L", "I", "I;16", "F")
_NIFTI_HEADERS = {348: nib.Nifti1Image, 540: nib.Nifti2Image}  # by sizeof_hdr


class MaskError(RadflowError, ValueError):
    """A mask Radflow refuses; ``reason`` is a short stable code, the message says what to do.

    Codes: ``unknown-format``, ``mask-size``, ``mask-values``, ``segment-count``, and from
    radflow.dicom.seg ``not-a-segmentation``, ``unknown-instances``, ``invalid-segmentation``;
    radflow.services.mask_review adds ``too-large``, ``empty-mask``, ``no-image``, ``no-file``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def read_mask(
    name: str,
    data: bytes,
    shape: tuple[int, ...],
    *,
    sources: Sequence[Dataset] = (),
    affine: NDArray[np.float64] | None = None,
    what: str = "mask",
) -> NDArray[np.bool_]:
    """The mask in ``data`` for an image of ``shape``: (rows, columns), or (slices, rows,
    columns) for a volume.

    ``name`` only names the file in messages; ``sources``: the image's header (a volume's: its
    slices in stack order), against which a DICOM SEG is read (without it a SEG is refused);
    ``affine``: a volume's (voxel index to LPS mm), onto which an oriented NIfTI is turned.
    Raises MaskError.
    """
    if data[128:132] == b"DICM":
        return _from_segmentation(name, data, shape, sources)
    if data[:2] == _GZIP or _nifti_class(data[:4]) is not None:
        return _from_nifti(name, data, shape, what, affine)
    if len(shape) == 3:
        raise MaskError(
            "unknown-format",
            f"{name} is no NIfTI or DICOM SEG; the mask of a volume is one of those",
        )
    return _from_picture(name, data, (shape[0], shape[1]), what)


def check_size(found: tuple[int, ...], shape: tuple[int, ...], name: str, what: str) -> None:
    """Refuse a mask of another size than its image, naming both sizes."""
    if tuple(found) == tuple(shape):
        return
    if len(shape) == 2 and len(found) == 2:
        raise MaskError(
            "mask-size",
            f"the {what} {name} is {found[1]}x{found[0]} but its image is {shape[1]}x{shape[0]} "
            "(columns x rows); give the mask of the same image",
        )
    sizes = ["x".join(str(n) for n in size) for size in (found, shape)]
    raise MaskError(
        "mask-size",
        f"the {what} {name} is {sizes[0]} but its volume is {sizes[1]} (slices x rows x "
        "columns); give the mask of the same series, on its grid",
    )


def _binary(values: NDArray[np.generic], name: str, what: str) -> NDArray[np.bool_]:
    if values.dtype.kind not in "biuf":
        raise MaskError("mask-values", f"the {what} {name} holds {values.dtype} values, not a mask")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise MaskError("mask-values", f"the {what} {name} holds NaN or infinite values")
    levels = np.unique(values)
    if levels.min() < 0 or np.count_nonzero(levels) > 1:
        shown = ", ".join(f"{v:g}" for v in levels[:5].astype(float))
        shown += ", ..." if len(levels) > 5 else ""
        raise MaskError(
            "mask-values",
            f"the {what} {name} holds {len(levels)} values ({shown}); a mask holds 0 for the "
            "background and one other value for the structure: threshold it first (or give "
            "the mask, not the image)",
        )
    return np.asarray(values != 0)


def _from_picture(name: str, data: bytes, shape: tuple[int, int], what: str) -> NDArray[np.bool_]:
    try:
        picture = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise MaskError("mask-size", f"the {what} {name} is far larger than any image") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise MaskError(
            "unknown-format", f"{name} is not a mask file Radflow reads; give {FORMATS}"
        ) from exc
    if picture.format not in PICTURE_FORMATS:
        raise MaskError(
            "unknown-format",
            f"{name} is a {picture.format} picture; a mask must be lossless: give {FORMATS}",
        )
    check_size((picture.height, picture.width), shape, name, what)  # before decoding
    try:
        # Grey or 16-bit pictures as they are; colours (a red mask on black) by luminance.
        grey = np.asarray(picture if picture.mode in _GREY_MODES else picture.convert("L"))
    except (OSError, ValueError) as exc:
        raise MaskError("unknown-format", f"{name} cannot be decoded ({exc})") from exc
    return _binary(grey, name, what)


def _nifti_class(head: bytes) -> type[nib.Nifti1Image] | None:
    if len(head) < 4:
        return None
    for order in ("<", ">"):
        found = _NIFTI_HEADERS.get(int(np.frombuffer(head, dtype=f"{order}i4")[0]))
        if found is not None:
            return found
    return None


def _from_nifti(
    name: str,
    data: bytes,
    shape: tuple[int, ...],
    what: str,
    affine: NDArray[np.float64] | None = None,
) -> NDArray[np.bool_]:
    image = _open_nifti(name, data)
    axes = tuple(int(n) for n in image.shape if n != 1)
    if len(shape) == 3:
        return _volume_from_nifti(name, image, shape, what, affine)
    if len(axes) != 2:
        raise MaskError(
            "mask-size",
            f"the {what} {name} has shape {image.shape}; a mask of a 2D image has two axes "
            "(columns, rows) besides axes of size 1",
        )
    check_size((axes[1], axes[0]), shape, name, what)  # before decoding
    return _binary(_voxels(name, image).reshape(axes).T, name, what)


def _voxels(name: str, image: nib.Nifti1Image) -> NDArray[np.generic]:
    try:
        return np.asanyarray(image.dataobj)
    except (EOFError, OSError, ValueError) as exc:
        raise MaskError("unknown-format", f"{name} is cut short or damaged ({exc})") from exc


_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _volume_from_nifti(
    name: str,
    image: nib.Nifti1Image,
    shape: tuple[int, ...],
    what: str,
    affine: NDArray[np.float64] | None,
) -> NDArray[np.bool_]:
    """A volume's mask from a NIfTI: turned onto the volume's grid when both say where their
    voxels lie, else read as (columns, rows, slices)."""
    if len(image.shape) < 3 or any(n != 1 for n in image.shape[3:]):
        raise MaskError(
            "mask-size",
            f"the {what} {name} has shape {image.shape}; a mask of a volume has three axes",
        )
    header = image.header
    oriented = int(header["sform_code"]) > 0 or int(header["qform_code"]) > 0
    if oriented and affine is not None:
        # nibabel's orientation functions carry no type hints.
        found_ornt = io_orientation(image.affine)  # type: ignore[no-untyped-call]
        grid_ornt = io_orientation(_LPS_TO_RAS @ affine)  # type: ignore[no-untyped-call]
        turn = ornt_transform(found_ornt, grid_ornt)  # type: ignore[no-untyped-call]
    else:
        turn = np.array([[2, 1], [1, 1], [0, 1]])  # (columns, rows, slices) as they are
    found = [0, 0, 0]
    for axis, (target, _) in enumerate(turn[:3]):
        found[int(target)] = int(image.shape[axis])
    check_size(tuple(found), shape, name, what)  # before decoding
    values = _voxels(name, image).reshape(image.shape[:3])
    turned = apply_orientation(values, turn)  # type: ignore[no-untyped-call]
    return _binary(np.ascontiguousarray(turned), name, what)


def _open_nifti(name: str, data: bytes) -> nib.Nifti1Image:
    """The NIfTI image in ``data`` (plain or gzipped), its header read, no voxel decoded."""
    stream: io.BufferedIOBase = io.BytesIO(data)
    try:
        if data[:2] == _GZIP:
            stream = gzip.GzipFile(fileobj=stream)
        kind = _nifti_class(stream.read(4))
        if kind is not None:
            stream.seek(0)
            image = kind.from_stream(stream)
            if image.header["magic"].item() in (b"n+1", b"n+2"):
                return image
    except (ImageFileError, HeaderDataError, EOFError, OSError, ValueError) as exc:
        raise MaskError(
            "unknown-format", f"{name} is not a readable NIfTI file ({exc}); give {FORMATS}"
        ) from exc
    raise MaskError(
        "unknown-format",
        f"{name} is not a mask file Radflow reads (nor a one-file NIfTI); give {FORMATS}",
    )


def _from_segmentation(
    name: str, data: bytes, shape: tuple[int, ...], sources: Sequence[Dataset]
) -> NDArray[np.bool_]:
    if not sources:
        raise MaskError(
            "unknown-instances",
            f"{name} is a DICOM file: a SEG names its images by UID, so give it for a study "
            "Radflow holds (on the study page), or give the mask as a picture or NIfTI",
        )
    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except (InvalidDicomError, EOFError, ValueError) as exc:
        raise MaskError("not-a-segmentation", f"{name} is not a readable DICOM file") from exc
    # Checked before the frames are decoded: a compressed SEG can declare any number of them.
    segments = len(header.get("SegmentSequence", []))
    frames = int(header.get("NumberOfFrames") or 1)
    if segments > 1:
        raise MaskError(
            "segment-count", f"the SEG {name} has {segments} segments; give one with one segment"
        )
    if "Rows" in header and "Columns" in header:
        found = (int(header.Rows), int(header.Columns))
        check_size((*shape[:-2], *found), shape, name, "SEG")
    if frames > len(sources) and len(shape) == 2:
        raise MaskError(
            "mask-size",
            f"the SEG {name} has {frames} frames but its image has {len(sources)}; give the SEG "
            "of this image",
        )
    try:
        mask = read_segmentation(data, sources)
    except SegmentationError as exc:
        raise MaskError(exc.reason, f"{name}: {exc}") from exc
    foreground = np.asarray(mask.foreground()[..., 0])  # (frames, rows, columns)
    return foreground if len(shape) == 3 else foreground[0]
