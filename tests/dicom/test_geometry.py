"""A series as one volume, from the index's geometry alone: order, spacing and every refusal."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from radflow.dicom.geometry import Slice, plan_series
from radflow.errors import NotAVolume

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _oblique() -> tuple[float, ...]:
    """Rows and columns turned 30 degrees about the patient's left-right axis."""
    angle = np.radians(30)
    return (1.0, 0.0, 0.0, 0.0, float(np.cos(angle)), float(np.sin(angle)))


def _stack(
    n: int = 10,
    *,
    spacing: float = 2.5,
    orientation: tuple[float, ...] = AXIAL,
    distances: list[float] | None = None,
) -> list[Slice]:
    """``n`` slices ``spacing`` mm apart along the orientation's normal (or at ``distances``)."""
    normal = np.cross(orientation[:3], orientation[3:])
    origin = np.array([-100.0, -120.0, 30.0])
    at = distances if distances is not None else [i * spacing for i in range(n)]
    return [
        Slice(
            object_key=f"k{i}",
            sha256=f"{i:064x}",
            rows=4,
            columns=4,
            position=tuple(float(v) for v in origin + d * normal),
            orientation=orientation,
            spacing=(0.7, 0.7),
        )
        for i, d in enumerate(at)
    ]


def _shuffled(slices: list[Slice], seed: int = 3) -> list[Slice]:
    order = np.random.default_rng(seed).permutation(len(slices))
    return [slices[i] for i in order]


@pytest.mark.parametrize("orientation", [AXIAL, _oblique()], ids=["axial", "oblique"])
def test_slices_are_ordered_along_the_normal_not_as_received(
    orientation: tuple[float, ...],
) -> None:
    stack = _stack(12, spacing=1.25, orientation=orientation)

    plan = plan_series(_shuffled(stack))

    # highdicom's order: the slice axis and the (row, column) axes a right-handed system, which
    # is down the normal (for axial slices: from the head down).
    assert [s.object_key for s in plan.slices] == [s.object_key for s in reversed(stack)]
    assert plan.axis == "space"
    assert plan.spacing == pytest.approx(1.25)
    assert plan.digest == plan_series(_shuffled(stack, seed=9)).digest


def test_digest_changes_with_the_pixels() -> None:
    stack = _stack(5)
    changed = [*stack[:-1], dataclasses.replace(stack[-1], sha256="f" * 64)]

    assert plan_series(stack).digest != plan_series(changed).digest


def _refusal(slices: list[Slice], **kwargs: object) -> str:
    with pytest.raises(NotAVolume) as caught:
        plan_series(slices, **kwargs)  # type: ignore[arg-type]
    return caught.value.reason


def test_a_gap_of_more_than_one_and_a_half_spacings_is_missing_slices() -> None:
    distances = [0.0, 2.0, 4.0, 6.0, 10.0, 12.0]  # 8.0 missing

    with pytest.raises(NotAVolume, match="about 1 slice"):
        plan_series(_stack(distances=distances))
    # 1.4x the median is uneven spacing, not a missing slice.
    assert _refusal(_stack(distances=[0.0, 2.0, 4.0, 6.8, 8.8, 10.8])) == "non-uniform-spacing"


def test_spacing_within_tolerance_is_one_volume() -> None:
    plan = plan_series(_stack(distances=[0.0, 2.0, 4.01, 5.99, 8.0]))

    assert plan.spacing == pytest.approx(2.0, abs=0.01)


def test_mixed_orientations() -> None:
    stack = _stack(6)
    stack[2] = dataclasses.replace(stack[2], orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0))

    assert _refusal(stack) == "mixed-orientations"


def test_mixed_sizes_and_pixel_spacings() -> None:
    sizes = _stack(6)
    sizes[1] = dataclasses.replace(sizes[1], rows=8)
    spacings = _stack(6)
    spacings[4] = dataclasses.replace(spacings[4], spacing=(0.9, 0.9))

    assert _refusal(sizes) == _refusal(spacings) == "mixed-sizes"


def test_a_localizer_mixed_in() -> None:
    stack = _stack(6)
    stack[0] = dataclasses.replace(stack[0], image_type="ORIGINAL\\PRIMARY\\LOCALIZER")

    assert _refusal(stack) == "localizer"


def test_duplicated_positions() -> None:
    stack = _stack(6)
    stack.append(dataclasses.replace(stack[3], object_key="again", sha256="e" * 64))

    assert _refusal(stack) == "duplicate-positions"


def test_more_voxels_than_the_limit() -> None:
    assert _refusal(_stack(6), max_voxels=6 * 16 - 1) == "too-many-voxels"
    assert plan_series(_stack(6), max_voxels=6 * 16).axis == "space"


def test_missing_geometry_too_few_slices_and_a_tilted_stack() -> None:
    no_position = _stack(5)
    no_position[2] = dataclasses.replace(no_position[2], position=None)
    tilted = [
        dataclasses.replace(s, position=(s.position[0], s.position[1] + 0.5 * i, s.position[2]))
        for i, s in enumerate(_stack(5))
        if s.position is not None
    ]

    assert _refusal(no_position) == "no-geometry"
    assert _refusal(_stack(2)) == "too-few-slices"
    assert _refusal([]) == "no-instances"
    assert _refusal(tilted) == "tilted-stack"


def test_a_time_series_at_one_position_for_a_sequence_task() -> None:
    frames = [
        dataclasses.replace(s, temporal=t, object_key=f"t{t}")
        for t, s in zip([3, 1, 2, 5, 4], [_stack(1)[0]] * 5, strict=True)
    ]

    plan = plan_series(frames, time=True)

    assert plan.axis == "time"
    assert [s.temporal for s in plan.slices] == [1, 2, 3, 4, 5]
    # Not a volume for a task that needs one.
    assert _refusal(frames) == "duplicate-positions"
