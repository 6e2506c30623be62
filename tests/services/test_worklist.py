"""The worklist query: triage order, latest score per study, filtered and paginated in SQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from factories import add_prediction, make_model_version, make_study, make_user
from sqlalchemy.orm import Session, sessionmaker

from radflow.db import StudyStatus, unit_of_work
from radflow.services.review import Verdict, submit_review
from radflow.services.worklist import (
    WorklistFilter,
    count_studies,
    filter_choices,
    list_studies,
    status_counts,
)
from radflow.store import ObjectStore


def accessions(session: Session, **kwargs: object) -> list[str | None]:
    rows, _ = list_studies(session, **kwargs)  # type: ignore[arg-type]
    return [r.accession for r in rows]


@pytest.fixture
def seeded(session_factory: sessionmaker[Session], store: ObjectStore) -> sessionmaker[Session]:
    """Five studies: three scored (0.2, 0.9, 0.6), two unscored, received in this order."""
    with unit_of_work(session_factory) as session:
        make_study(session, store, accession="LOW", score=0.2)
        make_study(session, store, accession="NEW-NONE")
        make_study(session, store, accession="HIGH", score=0.9)
        make_study(session, store, accession="MID", score=0.6)
        make_study(session, store, accession="LATE-NONE", status=StudyStatus.RECEIVING)
    return session_factory


def test_empty_database_gives_no_rows(session_factory: sessionmaker[Session]) -> None:
    with session_factory() as session:
        assert list_studies(session) == ([], 0)
        assert set(status_counts(session).values()) == {0}


def test_default_is_triage_flagged_first_then_longest_waiting(
    seeded: sessionmaker[Session],
) -> None:
    with seeded() as session:
        # HIGH and MID reach the 0.5 threshold (HIGH arrived first), LOW does not, then unscored.
        assert accessions(session) == ["HIGH", "MID", "LOW", "NEW-NONE", "LATE-NONE"]


def test_sorted_by_score_with_unscored_last_both_ways(seeded: sessionmaker[Session]) -> None:
    with seeded() as session:
        assert accessions(session, sort="score") == ["HIGH", "MID", "LOW", "LATE-NONE", "NEW-NONE"]
        assert accessions(session, sort="score", descending=False) == [
            "LOW",
            "MID",
            "HIGH",
            "NEW-NONE",
            "LATE-NONE",
        ]


def test_sorted_by_received(seeded: sessionmaker[Session]) -> None:
    with seeded() as session:
        assert accessions(session, sort="received") == [
            "LATE-NONE",
            "MID",
            "HIGH",
            "NEW-NONE",
            "LOW",
        ]
        assert accessions(session, sort="received", descending=False)[0] == "LOW"


def test_pages_cover_every_study_once_and_report_the_total(seeded: sessionmaker[Session]) -> None:
    with seeded() as session:
        pages = [list_studies(session, limit=2, offset=offset) for offset in (0, 2, 4)]
    assert [total for _, total in pages] == [5, 5, 5]
    assert [[r.accession for r in rows] for rows, _ in pages] == [
        ["HIGH", "MID"],
        ["LOW", "NEW-NONE"],
        ["LATE-NONE"],
    ]


def test_status_filter_limits_rows_and_total(seeded: sessionmaker[Session]) -> None:
    with seeded() as session:
        rows, total = list_studies(session, status="receiving")
        assert total == 1
        assert [r.accession for r in rows] == ["LATE-NONE"]
        assert [r.status for r in rows] == ["receiving"]
        rows, total = list_studies(session, status="scored", limit=1)
        assert (len(rows), total) == (1, 3)


def test_status_counts_cover_every_status(seeded: sessionmaker[Session]) -> None:
    with seeded() as session:
        counts = status_counts(session)
    assert list(counts) == [s.value for s in StudyStatus]
    assert counts["scored"] == 3
    assert counts["stable"] == 1
    assert counts["receiving"] == 1
    assert counts["failed"] == 0


def test_row_carries_model_threshold_and_flag(seeded: sessionmaker[Session]) -> None:
    with seeded() as session:
        rows, _ = list_studies(session)
    by_accession = {r.accession: r for r in rows}
    high, low, unscored = by_accession["HIGH"], by_accession["LOW"], by_accession["NEW-NONE"]
    assert (high.score, high.threshold, high.model, high.flagged) == (
        pytest.approx(0.9),
        0.5,
        "pneumonia-cxr:v1",
        True,
    )
    assert low.flagged is False
    assert (unscored.score, unscored.threshold, unscored.model, unscored.flagged) == (
        None,
        None,
        None,
        False,
    )
    assert high.patient.startswith("PSN")
    assert high.modality == "CR"
    assert high.received_at is not None


def test_latest_prediction_wins(session_factory: sessionmaker[Session], store: ObjectStore) -> None:
    with unit_of_work(session_factory) as session:
        old_model = make_model_version(session, version=1, threshold=0.5)
        new_model = make_model_version(session, version=2, threshold=0.7)
        rescored = make_study(session, store, accession="RESCORED", score=0.95, model=old_model)
        add_prediction(
            session,
            rescored,
            new_model,
            0.1,
            created_at=rescored.received_at + timedelta(hours=1),
        )
        make_study(session, store, accession="OTHER", score=0.5, model=old_model)
    with session_factory() as session:
        rows, total = list_studies(session)
    assert total == 2
    # The re-score (0.1 against v2's 0.7) moves RESCORED from flagged to below threshold.
    assert [(r.accession, r.score, r.model) for r in rows] == [
        ("OTHER", 0.5, "pneumonia-cxr:v1"),
        ("RESCORED", pytest.approx(0.1), "pneumonia-cxr:v2"),
    ]
    assert rows[1].threshold == pytest.approx(0.7)


def test_flag_at_threshold_is_inclusive(
    session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    with unit_of_work(session_factory) as session:
        make_study(session, store, score=0.5, model=make_model_version(session, threshold=0.5))
    with session_factory() as session:
        rows, _ = list_studies(session)
    assert rows[0].flagged is True


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"status": "lost"}, "not a study status"),
        ({"sort": "name"}, "sort='name'"),
        ({"limit": 0}, "limit=0"),
        ({"offset": -1}, "offset=-1"),
    ],
)
def test_bad_arguments_say_what_is_allowed(
    session_factory: sessionmaker[Session], kwargs: dict[str, object], message: str
) -> None:
    with session_factory() as session, pytest.raises(ValueError, match=message):
        list_studies(session, **kwargs)  # type: ignore[arg-type]


def test_triage_compares_each_score_with_its_own_models_threshold(
    session_factory: sessionmaker[Session], store: ObjectStore
) -> None:
    with unit_of_work(session_factory) as session:
        strict = make_model_version(session, task="pneumonia-cxr", version=1, threshold=0.8)
        lenient = make_model_version(session, task="pneumonia-cxr", version=2, threshold=0.3)
        make_study(session, store, accession="HIGH-BUT-BELOW", score=0.75, model=strict)
        make_study(session, store, accession="LOW-BUT-FLAGGED", score=0.35, model=lenient)
    with session_factory() as session:
        rows, _ = list_studies(session)
    assert [(r.accession, r.flagged) for r in rows] == [
        ("LOW-BUT-FLAGGED", True),
        ("HIGH-BUT-BELOW", False),
    ]


def where(session: Session, **kwargs: object) -> list[str | None]:
    f = WorklistFilter(**kwargs)  # type: ignore[arg-type]
    rows, total = list_studies(session, where=f)
    assert total == len(rows) == count_studies(session, f)
    return [r.accession for r in rows]


def test_filters_and_search(session_factory: sessionmaker[Session], store: ObjectStore) -> None:
    day = datetime(2024, 3, 1, tzinfo=UTC)
    with unit_of_work(session_factory) as session:
        v1 = make_model_version(session, version=1)
        v2 = make_model_version(session, version=2)
        other = make_model_version(session, task="other-task", version=1)
        make_study(session, store, accession="CR-V1", patient="PSN-ALPHA", score=0.9, model=v1)
        make_study(
            session, store, accession="CT-V2", modality="CT", score=0.2, model=v2, received_at=day
        )
        make_study(
            session,
            store,
            accession="OTHER",
            score=0.4,
            model=other,
            received_at=day + timedelta(days=1),
        )
        make_study(
            session,
            store,
            accession="BROKEN",
            status=StudyStatus.NO_MODEL,
            status_reason="no model applies to MR",
        )
        reviewer = make_user(session, "rita")
    with session_factory() as session:
        assert where(session, modality="CT") == ["CT-V2"]
        assert where(session, task="pneumonia-cxr") == ["CR-V1", "CT-V2"]
        assert where(session, model_version_id=v2.id) == ["CT-V2"]
        assert where(session, status="no_model") == ["BROKEN"]
        assert where(session, received_from=day, received_until=day + timedelta(days=1)) == [
            "CT-V2"
        ]
        assert where(session, search="PSN-ALP") == ["CR-V1"]
        assert where(session, search="CT-V") == ["CT-V2"]
        assert where(session, search="%") == []  # wildcards are literal
        rows, _ = list_studies(session, where=WorklistFilter(status="no_model"))
        assert rows[0].status_reason == "no model applies to MR"
    with unit_of_work(session_factory) as session:
        submit_review(
            session,
            reviewer,
            rows[0].study_uid,
            Verdict.LABEL,
            task="pneumonia-cxr",
            value="normal",
        )
    with session_factory() as session:
        assert where(session, reviewed=True) == ["BROKEN"]
        assert "BROKEN" not in where(session, reviewed=False)
        choices = filter_choices(session)
    assert choices.tasks == ["other-task", "pneumonia-cxr"]
    assert choices.modalities == ["CR", "CT"]
    assert choices.models[v2.id] == "pneumonia-cxr:v2"
