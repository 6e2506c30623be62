"""Routing rules: YAML matched on DICOM attributes; bad rule files fail with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest

from radflow.db import Instance, Series, Study
from radflow.routing import InvalidRoutingRules, default_rules, load_rules, parse_rules, route
from radflow.tasks import get_task

TASK = get_task("pneumonia-cxr")


def _study(*series: Series) -> Study:
    return Study(study_uid="1.2.3", series=list(series))


def _series(
    number: int = 1,
    modality: str | None = "DX",
    body_part: str | None = "CHEST",
    description: str | None = "CHEST PA",
    image_type: str | None = "ORIGINAL\\PRIMARY",
    rows: int = 512,
) -> Series:
    instance = Instance(sop_instance_uid=f"1.2.3.{number}.1", rows=rows, columns=rows)
    return Series(
        series_uid=f"1.2.3.{number}",
        number=number,
        modality=modality,
        body_part=body_part,
        description=description,
        image_type=image_type,
        instances=[instance],
    )


def test_packaged_rules_route_frontal_chest_radiographs() -> None:
    lateral, frontal = _series(1, description="CHEST LAT"), _series(2)
    routed = route(_study(lateral, frontal), TASK)
    assert routed.instance is frontal.instances[0] and routed.reason is None
    # A series without Body Part Examined is accepted ("" in the rule), as CR often comes.
    assert route(_study(_series(body_part=None, modality="CR")), TASK).instance is not None


def test_no_matching_series_gives_the_reason_per_series() -> None:
    routed = route(_study(_series(1, modality="CT"), _series(2, description="LATERAL")), TASK)
    assert routed.instance is None
    assert routed.reason is not None
    assert "series 1: frontal-chest-radiograph: modality CT not in ['DX', 'CR']" in routed.reason
    assert "series 2: frontal-chest-radiograph: series description 'LATERAL'" in routed.reason


def test_custom_rules_match_image_type_and_dimensions(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        """
rules:
  - name: small-originals
    task: pneumonia-cxr
    image_type_contains: [original]
    image_type_excludes: [LOCALIZER]
    max_rows: 1024
"""
    )
    rules = load_rules(path)
    assert route(_study(_series()), TASK, rules).instance is not None
    big = route(_study(_series(rows=2048)), TASK, rules)
    assert big.reason is not None and "2048 rows > 1024" in big.reason
    derived = route(_study(_series(image_type="DERIVED\\SECONDARY")), TASK, rules)
    assert derived.reason is not None and "image type lacks ['ORIGINAL']" in derived.reason
    localizer = route(_study(_series(image_type="ORIGINAL\\PRIMARY\\LOCALIZER")), TASK, rules)
    assert localizer.instance is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rules:\n  - {name: a, task: pneumonia-cxr, modalty: [DX]}", "rules.0.modalty"),
        ("rules:\n  - {name: a, task: no-such-task}", "unknown task 'no-such-task'"),
        ("rules:\n  - {name: a, task: pneumonia-cxr, series_description: '(('}", "regular expr"),
        ("rules:\n  - {name: a, task: pneumonia-cxr, min_rows: 0}", "rules.0.min_rows"),
        (
            "rules:\n  - {name: a, task: pneumonia-cxr}\n  - {name: a, task: pneumonia-cxr}",
            "repeated: ['a']",
        ),
        ("rules: [", "not valid YAML"),
        ("rules: []", "rules"),
    ],
)
def test_invalid_rule_files_are_refused_with_the_field(text: str, message: str) -> None:
    with pytest.raises(InvalidRoutingRules, match="RADFLOW_ROUTING_FILE") as info:
        parse_rules(text, "test.yaml")
    assert message in str(info.value)


def test_missing_rule_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(InvalidRoutingRules, match="cannot be read"):
        load_rules(tmp_path / "absent.yaml")


def test_packaged_rules_cover_every_task() -> None:
    from radflow.tasks import TASKS

    assert {rule.task for rule in default_rules().rules} == set(TASKS)
