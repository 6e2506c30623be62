"""Routing rules: YAML matched on DICOM attributes; bad rule files fail with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import Instance, Patient, Series, Study
from radflow.ingest.routing import (
    InvalidRoutingRules,
    candidates,
    default_rules,
    load_rules,
    parse_rules,
    route,
    route_series,
)
from radflow.learning.tasks import get_task

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


def _with_destination(change: str, *, twice: bool = False) -> str:
    """A rule file with one destination "pacs" (twice if asked), one field set by ``change``."""
    fields = {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.9", "port": "104"}
    if change:
        key, value = change.split(": ", 1)
        fields[key] = value
    item = "  - {" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}\n"
    return (
        f"destinations:\n{item * (2 if twice else 1)}rules:\n  - {{name: a, task: pneumonia-cxr}}\n"
    )


def test_destinations_are_read_with_the_rules_that_send_to_them() -> None:
    rules = parse_rules(
        """
destinations:
  - {name: pacs, ae_title: ' PACS ', host: pacs.example.org, port: 104}
  - {name: research, ae_title: ARCHIVE, host: 10.0.0.7, port: 11112, calling_ae_title: AI}
  - {name: cloud, stow_url: 'https://pacs.example.org/dicom-web/studies'}
rules:
  - {name: chest, task: pneumonia-cxr, send_to: [pacs, research, cloud]}
""",
        "test.yaml",
    )
    pacs = rules.destination("pacs")
    assert pacs is not None and pacs.ae_title == "PACS"  # surrounding spaces are not significant
    assert pacs.describe() == "pacs (PACS@pacs.example.org:104)"
    assert rules.destination("research").calling_ae_title == "AI"  # type: ignore[union-attr]
    cloud = rules.destination("cloud")
    assert cloud is not None and cloud.describe() == (
        "cloud (https://pacs.example.org/dicom-web/studies)"
    )
    assert rules.destination("elsewhere") is None
    routed = route(_study(_series()), TASK, rules)
    assert routed.rule is not None and routed.rule.send_to == ("pacs", "research", "cloud")
    assert default_rules().destinations == ()  # the packaged rules send nowhere


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
        (
            "rules:\n  - {name: a, task: pneumonia-cxr, send_to: [pacs]}",
            "rule a sends to ['pacs'], which are not among the destinations (none declared)",
        ),
        (_with_destination("ae_title: 'A\\\\B'"), "not an AE title"),
        (_with_destination("ae_title: ABCDEFGHIJKLMNOPQ"), "not an AE title"),
        (_with_destination("ae_title: '   '"), "not an AE title"),
        (_with_destination("port: 0"), "destinations.0.port"),
        (_with_destination("port: 70000"), "destinations.0.port"),
        (_with_destination("host: 'pacs; rm -rf'"), "destinations.0.host"),
        (_with_destination("speed: fast"), "destinations.0.speed"),
        (_with_destination("port: null"), "needs ae_title, host and port (C-STORE) or stow_url"),
        (_with_destination("stow_url: 'ftp://pacs/studies'"), "not a STOW-RS URL"),
        (_with_destination("stow_url: 'http://user:pw@pacs/studies'"), "without credentials"),
        (_with_destination("", twice=True), "destination names must be unique; repeated: ['pacs']"),
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
    from radflow.learning.tasks import TASKS

    assert {rule.task for rule in default_rules().rules} == set(TASKS)


def _stored_series(number: int | None, description: str, instance_numbers: list[int]) -> Series:
    uid = f"1.2.840.99.{number}"
    return Series(
        series_uid=uid,
        number=number,
        modality="DX",
        body_part="CHEST",
        description=description,
        image_type="ORIGINAL\\PRIMARY",
        instances=[
            Instance(
                sop_instance_uid=f"{uid}.{n}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                number=n,
                object_key=f"originals/{uid}/{n}.dcm",
                size_bytes=1,
                sha256=f"{number}-{n}",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                rows=512,
                columns=512,
            )
            for n in instance_numbers
        ],
    )


def test_candidates_route_a_batch_of_stored_studies_as_route_does_one(
    session_factory: sessionmaker[Session],
) -> None:
    """The batch path (scoring, training) reads each series' first image by instance number and
    picks the same image as routing the loaded ORM study."""
    with session_factory.begin() as session:
        study = Study(
            study_uid="1.2.840.99",
            patient=Patient(pseudonym="PSN-ROUTE"),
            series=[
                _stored_series(3, "CHEST PA", []),  # no instances
                _stored_series(2, "CHEST PA", [3, 1, 2]),
                _stored_series(1, "CHEST LATERAL", [1]),
            ],
        )
        empty = Study(study_uid="1.2.840.98", patient=Patient(pseudonym="PSN-EMPTY"))
        session.add_all([study, empty])
        session.flush()
        ids = (study.id, empty.id)
    with session_factory() as session:
        found = candidates(session, ids)
        assert set(found) == {ids[0]}  # a study without series has no candidates
        series = found[ids[0]]
        assert [s.number for s, _ in series] == [1, 2, 3]
        assert [first.sha256 if first else None for _, first in series] == ["1-1", "2-1", None]
        routed = route_series(series, TASK)
        assert routed.instance is not None
        assert routed.instance.object_key == "originals/1.2.840.99.2/1.dcm"
        loaded = session.get_one(Study, ids[0])
        assert route(loaded, TASK).instance.object_key == routed.instance.object_key  # type: ignore[union-attr]
        assert route_series([], TASK).reason == "no series for pneumonia-cxr ()"
