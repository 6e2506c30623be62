"""Synthetic chest radiographs and abdominal CT volumes, generated in code, written as DICOM.

The demo, the tests and the benchmarks need studies that behave like real chest radiographs
(valid DX headers, 12-bit pixels, patients with more than one study, a finding a small model can
learn) without ever touching patient data. Everything here is deterministic for a seed, so a test
failure can be reproduced from the seed alone.

The phantom is built in "density" units (how much the beam is attenuated along each ray): the
body adds density, air-filled lungs remove it, bone adds more. Density is then mapped to detector
values the way a processed DX image looks with MONOCHROME2: dense is bright, air is dark.

The CT phantom (:func:`adrenal_phantom`) is built in Hounsfield units around an adrenal gland,
as AdrenalMNIST3D crops real CT, so the demo shows a volume task (adrenal-ct-3d) scoring CT
series that arrive like a scanner's: one single-frame CT Image instance per axial slice.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from radflow.dicom.writer import DX_FOR_PRESENTATION, MAX_DX_VALUE, CTSeriesBuilder, cxr_dataset

__all__ = [
    "DX_FOR_PRESENTATION",
    "SyntheticStudy",
    "SyntheticVolume",
    "adrenal_phantom",
    "chest_phantom",
    "cxr_dataset",
    "write_ct_studies",
    "write_cxr_studies",
]

MANUFACTURER = "Radflow Synthetic"

_MAX_VALUE = MAX_DX_VALUE

# Fictional names (family, given, sex); any resemblance to real people is coincidence.
_NAMES: tuple[tuple[str, str, str], ...] = (
    ("Fenwick", "Alma", "F"),
    ("Okonkwo", "Daniel", "M"),
    ("Lindqvist", "Maja", "F"),
    ("Moreau", "Julien", "M"),
    ("Tanaka", "Hiroshi", "M"),
    ("Castellano", "Lucia", "F"),
    ("Brennan", "Siobhan", "F"),
    ("Novak", "Tomas", "M"),
    ("Haddad", "Rania", "F"),
    ("Petrov", "Ivan", "M"),
    ("Ferreira", "Ines", "F"),
    ("Schmidt", "Lukas", "M"),
    ("Mensah", "Abena", "F"),
    ("Kowalski", "Piotr", "M"),
    ("Nakamura", "Yui", "F"),
    ("Gallagher", "Sean", "M"),
    ("Rossi", "Giulia", "F"),
    ("Andersen", "Mikkel", "M"),
    ("Varga", "Eszter", "F"),
    ("Delgado", "Mateo", "M"),
)


@dataclass(frozen=True)
class SyntheticStudy:
    """One written study: where the file is, its identifiers and its ground-truth label."""

    path: Path
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    patient_id: str
    positive: bool


# --------------------------------------------------------------------------------------------
# Phantom
# --------------------------------------------------------------------------------------------


_Segment = tuple[float, float, float, float, float, float, float]


@dataclass(frozen=True)
class _Anatomy:
    """What stays the same for one patient across studies (so a repeat study looks related).

    Coordinates are normalised patient coordinates: u runs from the image's left edge (the
    patient's right) at -1 to its right edge at +1, v from the top at -1 to the bottom at +1.
    """

    body_hw: float
    neck_hw: float
    shoulder_v: float
    soft: float
    lung_cx: tuple[float, float]
    lung_aw: tuple[float, float]
    lung_cy: float
    lung_b: float
    dome_v: tuple[float, float]
    dome_h: float
    air: float
    heart_cx: float
    heart_cy: float
    heart_a: float
    heart_b: float
    heart_angle: float
    med_w: float
    spine_w: float
    vert_h: float
    vert_phase: float
    bone: float
    clav_v: float
    clav_th: float
    rib_v0: float
    rib_dv: float
    rib_th: float
    breasts: float
    gastric_bubble: bool
    granuloma: tuple[float, float] | None
    vessels: tuple[_Segment, ...]

    @staticmethod
    def sample(rng: np.random.Generator, female: bool | None = None) -> _Anatomy:
        """A random adult; ``female`` decides breast shadows (None: 40 % chance)."""
        u = rng.uniform
        lung_cx = u(0.38, 0.44)
        lung_aw = u(0.27, 0.31)
        lung_b = u(0.57, 0.65)
        dome = u(0.40, 0.52)
        lung_cy = dome + 0.07 - lung_b
        breast_chance = 0.4 if female is None else (0.85 if female else 0.0)
        granuloma = None
        if rng.random() < 0.25:
            side = -1.0 if rng.random() < 0.5 else 1.0
            granuloma = (side * (lung_cx + u(-0.12, 0.12)), lung_cy + u(-0.5, 0.3) * lung_b)
        return _Anatomy(
            body_hw=u(0.78, 0.86),
            neck_hw=u(0.17, 0.22),
            shoulder_v=u(-0.58, -0.5),
            soft=u(0.52, 0.60),
            lung_cx=(lung_cx, lung_cx - u(0.0, 0.03)),
            lung_aw=(lung_aw, lung_aw * u(0.88, 0.97)),
            lung_cy=lung_cy,
            lung_b=lung_b,
            dome_v=(dome - u(0.02, 0.06), dome),
            dome_h=u(0.08, 0.13),
            air=u(0.28, 0.34),
            heart_cx=u(0.06, 0.11),
            heart_cy=dome - u(0.17, 0.22),
            heart_a=u(0.36, 0.42),
            heart_b=u(0.22, 0.27),
            heart_angle=math.radians(u(18.0, 32.0)),
            med_w=u(0.10, 0.13),
            spine_w=u(0.065, 0.08),
            vert_h=u(0.10, 0.12),
            vert_phase=u(0.0, 1.0),
            bone=u(0.8, 1.2),
            clav_v=u(-0.50, -0.44),
            clav_th=u(0.026, 0.034),
            rib_v0=u(-0.74, -0.68),
            rib_dv=u(0.115, 0.13),
            rib_th=u(0.022, 0.027),
            breasts=u(0.04, 0.08) if rng.random() < breast_chance else 0.0,
            gastric_bubble=bool(rng.random() < 0.6),
            granuloma=granuloma,
            vessels=_sample_vessels(rng, lung_cy, lung_b),
        )


def _sample_vessels(
    rng: np.random.Generator, lung_cy: float, lung_b: float
) -> tuple[_Segment, ...]:
    """Vessel segments (u0, v0, u1, v1, width0, width1, amplitude) fanning out from the hila.

    Vessels are the normal markings every real lung shows; they are the main distractor a
    classifier has to learn to ignore, and like real ones they taper towards the periphery.
    """
    segments: list[_Segment] = []
    for side in (-1.0, 1.0):
        hu = side * rng.uniform(0.16, 0.2)
        hv = lung_cy + lung_b * rng.uniform(0.0, 0.12) - (0.03 if side > 0 else 0.0)
        for _ in range(int(rng.integers(8, 12))):
            # Angle from horizontal-lateral; positive means downwards. More and bigger vessels
            # go to the lower zones, as in an upright patient.
            phi = rng.uniform(-1.2, 1.3)
            su = hu + side * rng.uniform(0.0, 0.05)
            sv = hv + rng.uniform(-0.05, 0.05)
            length = rng.uniform(0.25, 0.45) * (1.0 + 0.2 * max(phi, 0.0))
            w0 = rng.uniform(0.009, 0.014) * (1.0 + 0.2 * max(phi, 0.0))
            amp = rng.uniform(0.03, 0.05)
            eu = su + side * math.cos(phi) * length
            ev = sv + math.sin(phi) * length
            segments.append((su, sv, eu, ev, w0, w0 * 0.35, amp))
            for _ in range(int(rng.integers(1, 3))):
                f = rng.uniform(0.35, 0.75)
                bu = su + (eu - su) * f
                bv = sv + (ev - sv) * f
                psi = phi + (-1.0 if rng.random() < 0.5 else 1.0) * rng.uniform(0.3, 0.7)
                bl = length * rng.uniform(0.3, 0.6)
                end_u = bu + side * math.cos(psi) * bl
                end_v = bv + math.sin(psi) * bl
                segments.append((bu, bv, end_u, end_v, w0 * (1 - 0.6 * f), w0 * 0.25, amp * 0.8))
    return tuple(segments)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1]; cached because every image of a size needs them."""
    c = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
    x = np.ascontiguousarray(np.broadcast_to(c[None, :], (size, size)))
    y = np.ascontiguousarray(np.broadcast_to(c[:, None], (size, size)))
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
    """Linear 0 -> 1 step over ``width`` centred on 0: soft anatomical edges without aliasing."""
    return np.clip(x * (1.0 / width) + 0.5, 0.0, 1.0)


def _tube(d: np.ndarray) -> np.ndarray:
    """Projected thickness of a cylinder at normalised distance ``d`` from its axis."""
    thickness: np.ndarray = np.sqrt(np.clip(1.0 - d * d, 0.0, 1.0))
    return thickness


def _fine_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Zero-mean, unit-variance random field correlated over about two pixels (lung texture).

    Drawn at half resolution and upsampled with a binomial blur: a quarter of the random
    numbers, which are the expensive part.
    """
    if size >= 64 and size % 2 == 0:
        low = rng.random((size // 2, size // 2), dtype=np.float32) - 0.5
        field = _blur3(np.repeat(np.repeat(low, 2, axis=0), 2, axis=1))
    else:
        field = _blur3(rng.random((size, size), dtype=np.float32) - 0.5)
    std = float(field.std())
    return field / std if std > 0 else field


def _upsample(coarse: np.ndarray, size: int, centres: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of a square grid whose samples sit at pixel ``centres``."""
    cells = coarse.shape[0]
    pos = np.clip(np.interp(np.arange(size), centres, np.arange(cells)), 0, cells - 1)
    lo = np.minimum(pos.astype(np.intp), cells - 2)
    frac = (pos - lo).astype(np.float32)
    rows = coarse[lo] * (1.0 - frac)[:, None] + coarse[lo + 1] * frac[:, None]
    out: np.ndarray = rows[:, lo] * (1.0 - frac)[None, :] + rows[:, lo + 1] * frac[None, :]
    return out


def _coarse_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-variance random field varying over about size/cells pixels."""
    white = rng.random((cells, cells), dtype=np.float32) - 0.5
    centres = (np.arange(cells) + 0.5) * (size / cells) - 0.5
    field = _blur3(_upsample(_blur3(white), size, centres))
    std = float(field.std())
    return field / std if std > 0 else field


def _lowpass(img: np.ndarray, cells: int) -> np.ndarray:
    """Strong blur (about size/cells wide): block means on a cells x cells grid, interpolated."""
    size = img.shape[0]
    # Block means from a subsample: the blocks are so large that aliasing cannot show.
    stride = max(1, size // 64)
    sub = img[stride // 2 :: stride, stride // 2 :: stride]
    edges = np.linspace(0, sub.shape[0], cells + 1).round().astype(np.intp)
    counts = np.diff(edges).astype(np.float32)
    coarse = np.add.reduceat(np.add.reduceat(sub, edges[:-1], axis=0), edges[:-1], axis=1)
    coarse = _blur3(coarse / (counts[:, None] * counts[None, :]))
    centres = ((edges[:-1] + edges[1:] - 1) * 0.5) * stride + stride // 2
    return _upsample(coarse, size, centres)


def _blur3(img: np.ndarray) -> np.ndarray:
    """Binomial [1 2 1]/4 blur along both axes, from shifted adds (cheaper than ndimage here)."""
    out = img * 0.5
    out[1:] += img[:-1] * 0.25
    out[:-1] += img[1:] * 0.25
    out[0] += img[0] * 0.25
    out[-1] += img[-1] * 0.25
    res = out * 0.5
    res[:, 1:] += out[:, :-1] * 0.25
    res[:, :-1] += out[:, 1:] * 0.25
    res[:, 0] += out[:, 0] * 0.25
    res[:, -1] += out[:, -1] * 0.25
    return res


def _pixel_box(size: int, x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice] | None:
    """Pixel slices (rows, cols) covering an image-coordinate rectangle; None if off-image."""
    half = size / 2.0
    c0 = max(0, math.floor((x0 + 1.0) * half - 0.5))
    c1 = min(size, math.ceil((x1 + 1.0) * half + 0.5))
    r0 = max(0, math.floor((y0 + 1.0) * half - 0.5))
    r1 = min(size, math.ceil((y1 + 1.0) * half + 0.5))
    if c0 >= c1 or r0 >= r1:
        return None
    return slice(r0, r1), slice(c0, c1)


def _add_vessels(out: np.ndarray, segments: np.ndarray) -> None:
    """Add tapering lines (rows of x0, y0, x1, y1, w0, w1, amp in image coordinates) to ``out``.

    Points every pixel along each line are deposited bilinearly with one ``bincount`` and the
    result gets a binomial blur: anti-aliased lines about two pixels wide, all vessels at once
    (per-vessel array work used to be most of the phantom's time). A vessel's width shows as
    contrast, as in a real radiograph where thinner vessels are fainter.
    """
    size = out.shape[0]
    half = size / 2.0
    p0 = (segments[:, 0:2] + 1.0) * half - 0.5
    delta = (segments[:, 2:4] + 1.0) * half - 0.5 - p0
    lengths = np.hypot(delta[:, 0], delta[:, 1])
    counts = np.ceil(lengths).astype(np.intp) + 2
    seg = np.repeat(np.arange(len(segments)), counts)
    starts = np.cumsum(counts) - counts
    t = (np.arange(int(counts.sum())) - starts[seg]) / (counts[seg] - 1)
    px = p0[seg, 0] + t * delta[seg, 0]
    py = p0[seg, 1] + t * delta[seg, 1]
    w0, w1 = segments[seg, 4], segments[seg, 5]
    spacing = lengths[seg] / (counts[seg] - 1)
    # 0.45: peak of a one-pixel line after the [1 2 1] blur, so the line peaks at ``amp``.
    weight = segments[seg, 6] * ((w0 + (w1 - w0) * t) / w0) * spacing / 0.45
    ix = np.floor(px).astype(np.intp)
    iy = np.floor(py).astype(np.intp)
    fx = px - ix
    fy = py - iy
    keep = (ix >= 0) & (ix < size - 1) & (iy >= 0) & (iy < size - 1)
    ix, iy, fx, fy, weight = ix[keep], iy[keep], fx[keep], fy[keep], weight[keep]
    base = iy * size + ix
    index = np.concatenate((base, base + 1, base + size, base + size + 1))
    vals = np.concatenate(
        (
            weight * (1.0 - fx) * (1.0 - fy),
            weight * fx * (1.0 - fy),
            weight * (1.0 - fx) * fy,
            weight * fx * fy,
        )
    )
    flat = np.bincount(index, weights=vals, minlength=size * size)
    out += _blur3(flat.reshape(size, size).astype(np.float32))


def _add_blob(out: np.ndarray, cx: float, cy: float, radius: float, amp: float) -> None:
    """Add a Gaussian blob (image coordinates) into ``out``, computed inside 3 radii only."""
    r3 = 3.0 * radius
    box = _pixel_box(out.shape[0], cx - r3, cy - r3, cx + r3, cy + r3)
    if box is None:
        return
    xg, yg = _grid(out.shape[0])
    dx = xg[box] - cx
    dy = yg[box] - cy
    out[box] += amp * np.exp((dx * dx + dy * dy) * (-0.5 / (radius * radius)))


class _Frame:
    """One exposure's geometry: patient coordinates (u, v) <-> image coordinates (x, y).

    Anatomy is described in patient coordinates; the small rotation, magnification and shift of
    each exposure live here, together with the bounding boxes that keep the rendering fast.
    """

    def __init__(self, size: int, theta: float, scale: float, tx: float, ty: float) -> None:
        self.size = size
        self.cos = math.cos(theta)
        self.sin = math.sin(theta)
        self.scale = scale
        self.tx = tx
        self.ty = ty

    def to_image(self, pu: float, pv: float) -> tuple[float, float]:
        s = self.scale
        return (
            self.tx + s * (self.cos * pu - self.sin * pv),
            self.ty + s * (self.sin * pu + self.cos * pv),
        )

    def to_image_array(self, pu: np.ndarray, pv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = self.scale
        return (
            self.tx + s * (self.cos * pu - self.sin * pv),
            self.ty + s * (self.sin * pu + self.cos * pv),
        )

    def uv(self, box: tuple[slice, slice] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Patient coordinates of the pixels in ``box`` (the whole image by default)."""
        xg, yg = _grid(self.size)
        if box is not None:
            xg, yg = xg[box], yg[box]
        inv = 1.0 / self.scale
        xs = (xg - self.tx) * inv
        ys = (yg - self.ty) * inv
        return self.cos * xs + self.sin * ys, self.cos * ys - self.sin * xs

    def box(self, u0: float, v0: float, u1: float, v1: float) -> tuple[slice, slice] | None:
        """Pixels covering the patient-coordinate rectangle [u0, u1] x [v0, v1]."""
        corners = [self.to_image(cu, cv) for cu in (u0, u1) for cv in (v0, v1)]
        xs = [c[0] for c in corners]
        ys = [c[1] for c in corners]
        return _pixel_box(self.size, min(xs), min(ys), max(xs), max(ys))


def chest_phantom(rng: np.random.Generator, size: int = 256, positive: bool = False) -> np.ndarray:
    """A synthetic PA chest radiograph: uint16, values 0..4095 (12 bits), MONOCHROME2.

    Each call draws a new patient anatomy and a new exposure from ``rng``. With ``positive`` the
    image also carries one or more pneumonia-like consolidations inside a lung field: soft-edged,
    patchy opacities of random lobe, size and density, faint enough to need looking for. Two
    generators in the same state give the same patient and exposure whatever ``positive`` is,
    so a positive and a negative image can be compared pixel for pixel.
    """
    return _render(rng, size, _Anatomy.sample(rng), positive)


def _render(rng: np.random.Generator, size: int, anat: _Anatomy, positive: bool) -> np.ndarray:
    """One exposure of ``anat``: the geometry, exposure and noise are drawn from ``rng``."""
    if size < 32:
        raise ValueError(f"phantom size must be at least 32 pixels, got {size}")
    frame = _Frame(
        size,
        theta=math.radians(rng.uniform(-3.0, 3.0)),
        scale=rng.uniform(0.93, 1.04),
        tx=rng.uniform(-0.05, 0.05),
        ty=rng.uniform(-0.03, 0.06),
    )
    inspiration = rng.uniform(-0.04, 0.04)
    # The lesions get their own stream, drawn whether or not they are used, so the same seed
    # gives the same exposure with and without disease (a paired, counterfactual image).
    lesion_rng = np.random.default_rng(int(rng.integers(2**63)))
    u, v = frame.uv()

    # Body: below the shoulders the trunk's half-width is a gentle barrel; above, it narrows
    # along the shoulder slope to the neck (written without np.where, which is slow on large
    # masks). The elliptical cross-section makes the flanks thinner (darker) than the middle.
    vt = np.maximum(v, anat.shoulder_v) - 0.15
    trunk = anat.body_hw * (1.0 - 0.12 * vt * vt)
    rise = np.clip((anat.shoulder_v - v) * (1.0 / 0.3), 0.0, 1.0)
    hw = anat.neck_hw + (trunk - anat.neck_hw) * (1.0 - rise * np.sqrt(rise))
    au = np.abs(u)
    body = _ramp(hw - au, 0.02)
    thick = np.sqrt(np.clip(1.0 - (u / (hw + 0.04)) ** 2, 0.0, 1.0))
    # A narrower section (neck, shoulder tops) is also a thinner one, so it is darker.
    dens = anat.soft * body * (0.25 + 0.75 * thick) * (0.55 + 0.45 * hw * (1.0 / anat.body_hw))

    bones = np.zeros_like(u)
    # Humeral heads at the top corners of the trunk.
    for side in (-1.0, 1.0):
        hx, hy = side * (anat.body_hw - 0.07), anat.shoulder_v + 0.03
        box = frame.box(hx - 0.09, hy - 0.09, hx + 0.09, hy + 0.09)
        if box is not None:
            bu, bv = frame.uv(box)
            ru, rv = (bu - hx) * (1.0 / 0.085), (bv - hy) * (1.0 / 0.085)
            bones[box] += 0.06 * np.sqrt(np.clip(1.0 - ru * ru - rv * rv, 0.0, 1.0))

    # Lungs, each cut at the bottom by its diaphragm dome (the right one sits higher).
    lungs = np.zeros_like(u)
    air = np.zeros_like(u)
    for i, side in enumerate((-1.0, 1.0)):
        cx, aw = anat.lung_cx[i], anat.lung_aw[i]
        dome_v = anat.dome_v[i] + inspiration
        top = anat.lung_cy - anat.lung_b
        lo, hi = side * (cx - aw * 1.05), side * (cx + aw * 1.05)
        box = frame.box(min(lo, hi), top - 0.02, max(lo, hi), dome_v + 0.03)
        if box is None:
            continue
        bu, bv = frame.uv(box)
        ru = (bu - side * cx) * side
        dv = (bv - anat.lung_cy) * (1.0 / anat.lung_b)
        widen = 0.8 + 0.2 * np.clip(dv * 0.5 + 0.5, 0.0, 1.0)
        du = ru / (aw * widen)
        # Round apex (quadratic above the centre), squarer base (quartic below it).
        up = np.minimum(dv, 0.0)
        down = np.maximum(dv, 0.0)
        down *= down
        f = du * du + up * up + down * down
        dome = dome_v - anat.dome_h * np.clip(1.0 - ((ru + 0.03) / (aw * 1.15)) ** 2, 0.0, 1.0)
        lung = _ramp(1.0 - f, 0.08) * _ramp(dome - bv, 0.015)
        lungs[box] += lung
        # Air depth grows towards the middle of each lung; soft tissue of the neck and shoulders
        # overlies the apex, which is why apices look greyer than the bases.
        depth = 0.35 + 0.65 * np.sqrt(np.clip(1.0 - f, 0.0, 1.0))
        air[box] += lung * depth * np.clip(1.2 + dv, 0.45, 1.0)

    # Heart and mediastinum lie between/in front of the lungs and hide them. The heart is a
    # large ventricular ellipse to the patient's left plus a smaller right atrium, which gives
    # the familiar asymmetric silhouette; the retrocardiac lung still shows through a little.
    heart_cy = anat.heart_cy + 0.5 * inspiration
    reach = max(anat.heart_a, anat.heart_b) + 0.05
    box = frame.box(
        anat.heart_cx - reach - 0.05, heart_cy - reach, anat.heart_cx + reach, heart_cy + reach
    )
    if box is not None:
        bu, bv = frame.uv(box)
        hu, hv = bu - anat.heart_cx - 0.05, bv - heart_cy
        ca, sa = math.cos(anat.heart_angle), math.sin(anat.heart_angle)
        hp = (ca * hu + sa * hv) * (1.0 / (0.85 * anat.heart_a))
        hq = (ca * hv - sa * hu) * (1.0 / anat.heart_b)
        heart = _ramp(1.0 - (hp * hp + hq * hq), 0.15)
        ru = (bu - (anat.heart_cx - 0.5 * anat.heart_a)) * (1.0 / 0.15)
        rv = (bv - (heart_cy + 0.04)) * (1.0 / (0.85 * anat.heart_b))
        heart = np.maximum(heart, _ramp(1.0 - (ru * ru + rv * rv), 0.2))
        hidden = 1.0 - 0.85 * heart
        lungs[box] *= hidden
        air[box] *= hidden
    box = frame.box(-anat.med_w - 0.03, -1.2, anat.med_w + 0.05, heart_cy + 0.05)
    if box is not None:
        bu, bv = frame.uv(box)
        med = _ramp(anat.med_w - np.abs(bu - 0.01), 0.03) * _ramp(heart_cy - bv, 0.1)
        # Aortic knob: the arch bulging to the patient's left above the heart.
        ku, kv = bu - (anat.med_w - 0.01), bv - (anat.lung_cy - 0.3 * anat.lung_b)
        knob = _ramp(0.065**2 - (ku * ku + kv * kv), 0.002)
        hidden = 1.0 - 0.92 * np.clip(med + knob, 0.0, 1.0)
        lungs[box] *= hidden
        air[box] *= hidden
        # Trachea: a darker air column down the upper mediastinum.
        carina = anat.lung_cy - 0.1 * anat.lung_b
        dens[box] -= 0.1 * _ramp(0.04 - np.abs(bu), 0.02) * _ramp(carina - bv, 0.06)
    dens -= anat.air * air

    if anat.gastric_bubble:
        gu0 = anat.lung_cx[1] - 0.05
        gv0 = anat.dome_v[1] + inspiration + 0.08
        box = frame.box(gu0 - 0.1, gv0 - 0.05, gu0 + 0.1, gv0 + 0.01)
        if box is not None:
            bu, bv = frame.uv(box)
            gu, gv = bu - gu0, bv - gv0
            bubble = _ramp(1.0 - (gu * gu * (1.0 / 0.0064) + gv * gv * (1.0 / 0.0016)), 0.3)
            dens[box] -= 0.07 * bubble * (gv < 0.005)

    if anat.breasts > 0:
        # Breast shadows: extra density over the lower zones, heaviest at the inframammary fold
        # and fading upwards. A classic false "lower-zone opacity" in negatives.
        centre = anat.dome_v[1] - 0.2
        box = frame.box(-0.85, centre - 0.26, 0.85, centre + 0.26)
        if box is not None:
            bu, bv = frame.uv(box)
            pv = (bv - centre) * (1.0 / 0.25)
            fade = np.clip(0.35 + 0.8 * pv, 0.0, 1.0)
            for side in (-1.0, 1.0):
                pu = (bu - side * 0.42) * (1.0 / 0.34)
                shape = np.clip(1.0 - (pu * pu + pv * pv), 0.0, 1.0)
                # Seen mostly against the lungs; over the abdomen it hardly changes contrast.
                dens[box] += anat.breasts * np.sqrt(shape) * fade * (0.3 + 0.7 * lungs[box])

    # Lung parenchyma texture and vessel markings, visible only against the air of the lungs.
    markings = np.zeros_like(u)
    s = frame.scale
    if anat.vessels:
        vessels = np.array(anat.vessels, dtype=np.float64)
        vessels[:, 0], vessels[:, 1] = frame.to_image_array(vessels[:, 0], vessels[:, 1])
        vessels[:, 2], vessels[:, 3] = frame.to_image_array(vessels[:, 2], vessels[:, 3])
        vessels[:, 4:6] *= s
        _add_vessels(markings, vessels)
    for side in (-1.0, 1.0):
        hx, hy = frame.to_image(side * 0.18, anat.lung_cy + 0.08 * anat.lung_b)
        _add_blob(markings, hx, hy, 0.05 * s, 0.04)
    if anat.granuloma is not None:
        gx, gy = frame.to_image(*anat.granuloma)
        _add_blob(markings, gx, gy, 0.007 * s, 0.2)
    markings += 0.008 * _fine_noise(rng, size)
    np.clip(lungs, 0.0, 1.0, out=lungs)
    dens += markings * lungs

    # Spine, faint through the mediastinum, with darker disc spaces between vertebrae.
    box = frame.box(-anat.spine_w, -1.2, anat.spine_w, 1.2)
    if box is not None:
        bu, bv = frame.uv(box)
        phase = (bv - anat.vert_phase) * (1.0 / anat.vert_h)
        frac = phase - np.floor(phase) - 0.5
        vert = 1.0 - 0.4 * np.exp(frac * frac * (-1.0 / 0.012))
        bones[box] += 0.035 * _tube(bu * (1.0 / anat.spine_w)) * vert

    # Clavicles (S-shaped, rising laterally) and rib arcs on each side.
    extent = anat.lung_cx[0] + anat.lung_aw[0] + 0.05
    for side in (-1.0, 1.0):
        lo, hi = side * 0.05, side * 0.65
        box = frame.box(min(lo, hi), anat.clav_v - 0.2, max(lo, hi), anat.clav_v + 0.08)
        if box is not None:
            bu, bv = frame.uv(box)
            t = (bu * side - 0.07) * (1.0 / 0.55)
            vc = anat.clav_v - 0.13 * t + 0.02 * np.sin(t * (2.0 * math.pi))
            th = anat.clav_th * (1.2 - 0.4 * np.clip(t, 0.0, 1.0))
            bones[box] += 0.06 * _tube((bv - vc) / th) * _ramp(t, 0.05) * _ramp(1.0 - t, 0.05)

        lo, hi = side * 0.05, side * (extent + 0.02)
        v_lo = anat.rib_v0 - 0.05
        v_hi = anat.rib_v0 + 9.6 * anat.rib_dv + 0.25
        box = frame.box(min(lo, hi), v_lo, max(lo, hi), v_hi)
        if box is None:
            continue
        bu, bv = frame.uv(box)
        rt = np.maximum(bu * (side / extent), 0.0)
        lung_here = lungs[box]
        # Posterior ribs: a shallow arch from the spine that turns down at the chest wall.
        # All ribs of a side share the shape, so one periodic evaluation draws all of them.
        phase = (bv - anat.rib_v0 + 0.15 * rt - 0.45 * rt * rt * np.sqrt(rt)) * (1.0 / anat.rib_dv)
        k = np.floor(phase + 0.5)
        d = (phase - k) * (anat.rib_dv / anat.rib_th)
        lateral = _ramp(rt - 0.12, 0.08) * _ramp(1.0 - rt, 0.05) * ((k >= 0) & (k <= 9))
        rib = np.sqrt(_tube(d)) * lateral
        # Anterior ribs run obliquely down towards the sternum and fade where cartilage starts.
        phase = (bv - anat.rib_v0 - 0.22 - 0.3 * (1.0 - rt)) * (1.0 / anat.rib_dv)
        k = np.floor(phase + 0.5)
        d = (phase - k) * (anat.rib_dv / (anat.rib_th * 1.2))
        front = _ramp(rt - 0.55, 0.25) * _ramp(1.0 - rt, 0.05) * ((k >= 0) & (k <= 6))
        rib += 0.45 * _tube(d) * front
        # Bone stands out against air, much less against soft tissue (scatter, processing).
        bones[box] += 0.03 * rib * (0.2 + 0.8 * lung_here)
    dens += anat.bone * bones * body

    if positive:
        dens += _consolidations(lesion_rng, size, lungs)

    return _expose(rng, dens, body)


def _expose(rng: np.random.Generator, dens: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Density -> processed 12-bit detector values, varying like real exposures and processing.

    Heel-effect gradient, large-kernel dynamic range compression and small-kernel edge
    enhancement (as every DX vendor applies), a random tone curve and signal-dependent noise.
    """
    size = dens.shape[0]
    x, y = _grid(size)
    dens += (rng.uniform(-0.03, 0.03) * x + rng.uniform(-0.03, 0.03) * y) * body
    # Normalised convolution: the air around the body must not count as "dark surroundings",
    # or the flanks would be brightened into a white rim.
    big = _lowpass(dens, 6) / np.maximum(_lowpass(body, 6), 0.05)
    inside = float((big * body).sum() / max(float(body.sum()), 1.0))
    dens -= rng.uniform(0.15, 0.35) * (big - inside) * body
    dens += rng.uniform(0.3, 0.8) * (dens - _blur3(_blur3(dens)))
    contrast = rng.uniform(0.88, 1.12) / 0.72
    level = rng.uniform(-0.03, 0.03)
    norm = np.clip(dens * contrast + level, 0.0, 1.0)
    # A gamma-like tone curve (darker mid-tones), as a quadratic because pow() is slow.
    bend = rng.uniform(0.0, 0.45)
    norm = norm * ((1.0 - bend) + bend * norm)
    lo, hi = rng.uniform(0.01, 0.04), rng.uniform(0.85, 0.97)
    values = norm * ((hi - lo) * _MAX_VALUE) + lo * _MAX_VALUE
    # Uniform rather than Gaussian quantum noise: indistinguishable by eye, three times cheaper.
    noise = rng.random((size, size), dtype=np.float32) - 0.5
    values += noise * (rng.uniform(35.0, 80.0) * (0.5 + norm))
    return np.clip(np.rint(values), 0, _MAX_VALUE).astype(np.uint16)


def _consolidations(rng: np.random.Generator, size: int, lungs: np.ndarray) -> np.ndarray:
    """Density of one to three patchy, soft-edged consolidations inside the lung fields.

    Each is a cluster of overlapping lobules broken up by a random texture, so it is neither a
    disc nor uniform, and it is confined by the lung outline like real airspace disease.
    """
    out = np.zeros_like(lungs)
    inside = np.flatnonzero(lungs.ravel() > 0.8)
    if inside.size == 0:
        return out
    count = int(rng.choice((1, 2, 3), p=(0.45, 0.35, 0.2)))
    xg, yg = _grid(size)
    for _ in range(count):
        centre = int(rng.choice(inside))
        cx = float(xg.ravel()[centre])
        cy = float(yg.ravel()[centre])
        radius = rng.uniform(0.12, 0.26)
        amp = rng.uniform(0.08, 0.16)
        cluster = np.zeros_like(lungs)
        x0, y0, x1, y1 = cx, cy, cx, cy
        for _ in range(int(rng.integers(3, 7))):
            bx = cx + rng.normal(0.0, 0.45 * radius)
            by = cy + rng.normal(0.0, 0.45 * radius)
            rho = radius * rng.uniform(0.35, 0.7)
            _add_blob(cluster, bx, by, rho, 1.0)
            x0, y0 = min(x0, bx - 2.2 * rho), min(y0, by - 2.2 * rho)
            x1, y1 = max(x1, bx + 2.2 * rho), max(y1, by + 2.2 * rho)
        # Where the lobules overlap enough they merge into one confluent patch.
        box = _pixel_box(size, x0, y0, x1, y1)
        if box is not None:
            out[box] += amp * _ramp(cluster[box] - 0.5, 0.8)
    texture = _coarse_noise(rng, size, 24)
    out *= np.clip(1.0 + 0.5 * texture, 0.0, None)
    out *= lungs
    return out


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Studies on disk
# --------------------------------------------------------------------------------------------


def _uid(seed: int, *parts: object) -> str:
    """A UID that depends only on the seed and ``parts``, so reruns write identical files.

    pydicom joins the entropy sources without a separator: ("1", "11") and ("11", "1") give
    the same UID, so a part made of several numbers is one string ("1.11")."""
    return str(generate_uid(entropy_srcs=["radflow-synthetic", str(seed), *map(str, parts)]))


def _accession(study_uid: str) -> str:
    """A 12-digit accession number derived from the study UID: stable, and distinct across seeds."""
    digest = hashlib.sha256(study_uid.encode("ascii")).digest()
    return f"RF{int.from_bytes(digest[:8], 'big') % 10**12:012d}"


def _labels(rng: np.random.Generator, n: int, prevalence: float) -> Sequence[bool]:
    """Exactly round(n * prevalence) positives in random order (exact, so tests can rely on it)."""
    positives = round(n * prevalence)
    labels = np.zeros(n, dtype=bool)
    labels[:positives] = True
    rng.shuffle(labels)
    return [bool(v) for v in labels]


def write_cxr_studies(
    out_dir: Path, n: int, *, seed: int = 0, prevalence: float = 0.4, size: int = 256
) -> list[SyntheticStudy]:
    """Write ``n`` one-image chest studies to ``out_dir/<study_uid>/<sop_uid>.dcm``.

    About a quarter of patients get a second study months later, with the same anatomy, so
    splitting by study instead of by patient leaks. Output (pixels and UIDs) depends only on
    the arguments.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= prevalence <= 1.0:
        raise ValueError(f"prevalence must be between 0 and 1, got {prevalence}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")

    rng = np.random.default_rng([seed, 0x5C4])
    labels = _labels(rng, n, prevalence)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_day = dt.datetime(2023, 1, 2, 8, 0, 0)

    studies: list[SyntheticStudy] = []
    patient = 0
    while len(studies) < n:
        family, given, sex = _NAMES[int(rng.integers(len(_NAMES)))]
        patient_id = f"SYN{seed}-{patient:05d}"
        initial = chr(ord("A") + int(rng.integers(26)))
        patient_name = f"{family}^{given}^{initial}"
        anatomy = _Anatomy.sample(np.random.default_rng([seed, 0xA7A, patient]), sex == "F")
        first = base_day + dt.timedelta(
            days=int(rng.integers(0, 540)), minutes=int(rng.integers(0, 600))
        )
        birth = (first - dt.timedelta(days=int(rng.integers(18 * 365, 90 * 365)))).date()
        visits = 2 if rng.random() < 0.25 else 1
        when = first
        for visit in range(visits):
            index = len(studies)
            if index >= n:
                break
            if visit:
                when += dt.timedelta(
                    days=int(rng.integers(20, 400)), minutes=int(rng.integers(600))
                )
            positive = labels[index]
            pixels = _render(np.random.default_rng([seed, 0x1A6, index]), size, anatomy, positive)
            study_uid = _uid(seed, "study", index)
            series_uid = _uid(seed, "series", index)
            sop_uid = _uid(seed, "sop", index)
            ds = cxr_dataset(
                pixels,
                patient_id=patient_id,
                patient_name=patient_name,
                study_uid=study_uid,
                accession=_accession(study_uid),
                series_uid=series_uid,
                sop_instance_uid=sop_uid,
                patient_birth_date=birth,
                patient_sex=sex,
                study_datetime=when,
                study_id=str(index + 1),
                manufacturer=MANUFACTURER,
                model_name="Phantom CXR",
            )
            path = out_dir / study_uid / f"{sop_uid}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
            studies.append(
                SyntheticStudy(
                    path=path,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    sop_instance_uid=sop_uid,
                    patient_id=patient_id,
                    positive=positive,
                )
            )
        patient += 1
    return studies


# --------------------------------------------------------------------------------------------
# Abdominal CT volumes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticVolume:
    """One written CT study: a series of axial slices, its identifiers and its ground truth."""

    paths: tuple[Path, ...]  # the slices, inferior to superior
    study_uid: str
    series_uid: str
    patient_id: str
    positive: bool  # an adrenal mass


CT_SPACING_MM = (1.75, 1.25, 1.25)
"""(between slices, rows, columns) of the phantom volumes: a 42 x 40 x 40 mm field around the
adrenal gland, as AdrenalMNIST3D crops it (radflow.learning.tasks.adrenal_ct_3d)."""

_FAT_HU, _GLAND_HU, _KIDNEY_HU, _VESSEL_HU = -100.0, 30.0, 35.0, 45.0


def _segment_distance(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance (mm) of each of ``points`` (..., 3) to the segment from ``start`` to ``end``."""
    direction = end - start
    along = np.clip(((points - start) @ direction) / float(direction @ direction), 0.0, 1.0)
    nearest = start + along[..., None] * direction
    distance: np.ndarray = np.linalg.norm(points - nearest, axis=-1)
    return distance


def _soft(distance: np.ndarray, radius: float) -> np.ndarray:
    """1 inside ``radius`` (mm), 0 outside, over a 1 mm edge (partial volume)."""
    weight: np.ndarray = np.clip(radius + 0.5 - distance, 0.0, 1.0)
    return weight


def adrenal_phantom(
    rng: np.random.Generator, shape: tuple[int, int, int] = (24, 32, 32), positive: bool = False
) -> np.ndarray:
    """A (slices, rows, columns) volume in HU around a left adrenal gland, slices inferior first.

    Retroperitoneal fat with the upper pole of the kidney below, the crus of the diaphragm and a
    vessel beside it, and the gland itself: a thin inverted Y of soft tissue. ``positive`` adds
    a mass: a round soft-tissue nodule 8-12 mm across growing from one limb.
    """
    spacing = np.asarray(CT_SPACING_MM)
    grid = np.stack(np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]], axis=-1) * spacing
    centre = (np.asarray(shape) - 1) * spacing / 2 + rng.uniform(-3.0, 3.0, 3)
    u = rng.uniform

    def at(z: float, y: float, x: float) -> np.ndarray:
        """A point (mm) relative to the volume's centre."""
        point: np.ndarray = centre + np.array([z, y, x])
        return point

    hu = np.full(shape, _FAT_HU)
    # The kidney's upper pole: an ellipsoid (semi-axes in mm), its edge a 1 mm ramp.
    radii = np.array([u(9, 12), u(10, 13), u(8, 10)])
    kidney = np.linalg.norm((grid - at(-14.0, u(4, 8), u(-4, 4))) / radii, axis=-1)
    hu += (_KIDNEY_HU - _FAT_HU) * _soft((kidney - 1.0) * radii.mean(), 0.0)
    crus_x = centre[2] + u(-17, -13)
    crus = _segment_distance(
        grid, np.array([0.0, centre[1] + 12, crus_x]), np.array([shape[0] * 2.0, centre[1], crus_x])
    )
    hu = np.maximum(hu, _FAT_HU + (_VESSEL_HU - _FAT_HU) * _soft(crus, u(2.5, 3.5)))
    vessel_y = centre[1] + u(-15, -12)
    vessel = _segment_distance(
        grid, np.array([0.0, vessel_y, centre[2]]), np.array([shape[0] * 2.0, vessel_y, centre[2]])
    )
    hu = np.maximum(hu, _FAT_HU + (_VESSEL_HU - _FAT_HU) * _soft(vessel, u(3.0, 4.5)))

    # The gland: a body and two limbs, each a thin plate of soft tissue.
    body = at(u(2, 5), -6.0, 0.0)
    limbs = [at(u(-8, -5), u(4, 7), u(-7, -4)), at(u(-8, -5), u(4, 7), u(4, 7))]
    gland = np.minimum(*[_segment_distance(grid, body, end) for end in limbs])
    gland = np.minimum(gland, _segment_distance(grid, body, at(0.0, -1.0, 0.0)))
    hu = np.maximum(hu, _FAT_HU + (_GLAND_HU - _FAT_HU) * _soft(gland, u(1.4, 2.0)))
    noise = rng.normal(0.0, 14.0, shape)  # drawn before the mass: the same patient either way
    if positive:
        limb = limbs[int(rng.integers(2))]
        where = body + (limb - body) * u(0.5, 1.0)
        nodule = np.linalg.norm(grid - where, axis=-1)
        hu = np.maximum(hu, _FAT_HU + (u(20, 40) - _FAT_HU) * _soft(nodule, u(4.0, 6.0)))

    smoothed = (noise + np.roll(noise, 1, axis=2) + np.roll(noise, 1, axis=1)) / 3.0
    volume: np.ndarray = hu + smoothed
    return volume


def write_ct_studies(
    out_dir: Path,
    n: int,
    *,
    seed: int = 0,
    prevalence: float = 0.5,
    shape: tuple[int, int, int] = (24, 32, 32),
) -> list[SyntheticVolume]:
    """Write ``n`` abdominal CT studies (one patient each, one axial series of ``shape[0]``
    slices) to ``out_dir/<study_uid>/<slice>.dcm``. Output depends only on the arguments."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= prevalence <= 1.0:
        raise ValueError(f"prevalence must be between 0 and 1, got {prevalence}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rng = np.random.default_rng([seed, 0xC7])
    labels = _labels(rng, n, prevalence)
    when = dt.datetime(2024, 3, 4, 8, 0, 0)
    volumes = []
    for index, positive in enumerate(labels):
        family, given, sex = _NAMES[int(rng.integers(len(_NAMES)))]
        study_uid, series_uid = _uid(seed, "ct-study", index), _uid(seed, "ct-series", index)
        builder = CTSeriesBuilder(
            rows=shape[1],
            columns=shape[2],
            spacing=CT_SPACING_MM,
            patient_id=f"SYNCT{seed}-{index:05d}",
            patient_name=f"{family}^{given}",
            study_uid=study_uid,
            series_uid=series_uid,
            study_datetime=when + dt.timedelta(hours=index),
            accession=_accession(study_uid),
            study_id=str(index + 1),
            patient_sex=sex,
            manufacturer=MANUFACTURER,
            model_name="Phantom CT",
        )
        hu = adrenal_phantom(np.random.default_rng([seed, 0xAD7, index]), shape, positive)
        folder = out_dir / study_uid
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for z in range(shape[0]):
            ds = builder.slice(z, hu[z], sop_instance_uid=_uid(seed, "ct-sop", f"{index}.{z}"))
            path = folder / f"{z:03d}.dcm"
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
            paths.append(path)
        patient_id = str(builder.dataset.PatientID)
        volumes.append(SyntheticVolume(tuple(paths), study_uid, series_uid, patient_id, positive))
    return volumes
