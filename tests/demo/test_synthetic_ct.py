"""Synthetic abdominal CT: valid CT Image series, one volume each, deterministic, and a mass
that is really in the pixels of the positive studies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from demo.synthetic import CT_SPACING_MM, SyntheticVolume, adrenal_phantom, write_ct_studies
from radflow.dicom.geometry import Slice, plan_series
from radflow.dicom.instance import read_header

SHAPE = (12, 32, 32)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> list[SyntheticVolume]:
    return write_ct_studies(tmp_path_factory.mktemp("ct"), 4, seed=3, shape=SHAPE)


def test_each_study_is_one_axial_ct_volume(volumes: list[SyntheticVolume]) -> None:
    assert [v.positive for v in volumes].count(True) == 2
    assert len({v.patient_id for v in volumes}) == len({v.study_uid for v in volumes}) == 4
    for volume in volumes:
        headers = [read_header(path, 1 << 30) for path in volume.paths]
        assert {h.study_uid for h in headers} == {volume.study_uid}
        assert {h.modality for h in headers} == {"CT"}
        slices = [
            Slice(
                str(path),
                str(i),
                h.rows,
                h.columns,
                h.frames,
                h.image_type,
                h.image_position,
                h.image_orientation,
                h.pixel_spacing,
                h.temporal_position,
            )
            for i, (path, h) in enumerate(zip(volume.paths, headers, strict=True))
        ]
        plan = plan_series(slices[5:] + slices[:5])  # by position, whatever the order given
        # highdicom's stack order runs down the normal: from the last slice written (superior)
        assert [s.object_key for s in plan.slices] == [str(p) for p in volume.paths[::-1]]
        assert (plan.depth, plan.spacing) == (SHAPE[0], pytest.approx(CT_SPACING_MM[0]))
        ds = pydicom.dcmread(volume.paths[0])
        assert (ds.RescaleType, ds.BodyPartExamined) == ("HU", "ABDOMEN")


def test_every_slice_has_its_own_uid(tmp_path: Path) -> None:
    # Slice 11 of study 1 and slice 1 of study 11 once shared a SOP Instance UID (pydicom joins
    # entropy sources without a separator): ingest kept one of the two.
    volumes = write_ct_studies(tmp_path, 12, shape=(12, 8, 8))
    uids = [pydicom.dcmread(p).SOPInstanceUID for v in volumes for p in v.paths]
    assert len(set(uids)) == len(uids) == 12 * 12


def test_the_same_seed_writes_the_same_files(tmp_path: Path) -> None:
    first = write_ct_studies(tmp_path / "a", 2, seed=5, shape=SHAPE)
    again = write_ct_studies(tmp_path / "b", 2, seed=5, shape=SHAPE)
    for one, other in zip(first, again, strict=True):
        assert one.study_uid == other.study_uid
        assert [p.read_bytes() for p in one.paths] == [p.read_bytes() for p in other.paths]


def test_a_mass_adds_soft_tissue_where_there_was_fat() -> None:
    # The same anatomy (same generator state) with and without the mass: the mass is the only
    # difference, a compact soft-tissue nodule of about 8-12 mm.
    normal = adrenal_phantom(np.random.default_rng(11), SHAPE, positive=False)
    mass = adrenal_phantom(np.random.default_rng(11), SHAPE, positive=True)
    grown = (mass - normal) > 60.0
    voxel_mm3 = float(np.prod(CT_SPACING_MM))
    assert 150.0 < grown.sum() * voxel_mm3 < 1500.0
    assert -20.0 < float(mass[grown].mean()) < 60.0
