"""Values checked against their columns before they are written, so that PostgreSQL (which
refuses NUL in text and out-of-range integers) and SQLite (which stores them) index alike."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pydicom
from bad_inputs import changed
from factories import dicom_bytes
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from radflow import ingest
from radflow.db import Instance, Rejection, Series, Study
from radflow.dicom.instance import read_header
from radflow.settings import Settings
from radflow.store import ObjectStore


def _instance_number(value: str):  # type: ignore[no-untyped-def]
    def change(ds: Dataset) -> None:
        # 20 digits are longer than IS allows; written as a sender would, unvalidated.
        ds["InstanceNumber"] = pydicom.DataElement("InstanceNumber", "IS", value)

    return change


def _warnings(session_factory: sessionmaker[Session]) -> list[tuple[str | None, str]]:
    with session_factory() as session:
        rows = session.scalars(
            select(Rejection).where(Rejection.source == "warning").order_by(Rejection.origin)
        ).all()
        return [(r.origin, r.reason) for r in rows]


def test_values_the_columns_cannot_hold_are_dropped_with_a_warning_or_refused(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    sop = {name: generate_uid() for name in ("twelve", "twenty", "series", "nul")}
    files = {
        "twelve": changed(
            dicom_bytes(sop_instance_uid=sop["twelve"]), _instance_number("999999999999")
        ),
        "twenty": changed(dicom_bytes(sop_instance_uid=sop["twenty"]), _instance_number("1" * 20)),
        "series": changed(
            dicom_bytes(sop_instance_uid=sop["series"]),
            lambda ds: setattr(ds, "SeriesNumber", "-99999999999"),
        ),
        "nul": changed(
            dicom_bytes(sop_instance_uid=sop["nul"]),
            lambda ds: setattr(ds, "StudyDescription", "CHEST\0PA"),
        ),
        "frames": changed(
            dicom_bytes(),
            lambda ds: (
                setattr(ds, "NumberOfFrames", "30000000000"),
                setattr(ds, "Rows", 1),
                setattr(ds, "Columns", 1),
            ),
        ),
    }
    for name, data in files.items():
        (folder / f"{name}.dcm").write_bytes(data)

    report = ingest.ingest_files(
        ingest.find_files(folder), settings=settings, session_factory=session_factory, store=store
    )

    # 3x10^10 frames cannot be held by the column, nor match the pixel data sent: reading
    # refuses the file (too-large) before the column check would (bad-dimensions).
    assert report.stored == 4 and len(report.reasons) == 1
    assert set(report.reasons) <= {"bad-dimensions", "too-large"}
    assert "30000000000" in report.rejected[str(folder / "frames.dcm")]
    assert sorted(Path(p).name for p in report.warnings) == [
        "nul.dcm",
        "series.dcm",
        "twelve.dcm",
        "twenty.dcm",
    ]
    assert "InstanceNumber is not a number" in report.warnings[str(folder / "twelve.dcm")][0]
    assert "study_description contains a NUL" in report.warnings[str(folder / "nul.dcm")][0]
    with session_factory() as session:
        numbers = dict(session.execute(select(Instance.sop_instance_uid, Instance.number)).all())
        assert numbers == {
            sop["twelve"]: None,
            sop["twenty"]: None,
            sop["series"]: 1,
            sop["nul"]: 1,
        }
        series = session.scalar(
            select(Series).join(Series.instances).where(Instance.sop_instance_uid == sop["series"])
        )
        assert series is not None and series.number is None
        study = session.scalar(
            select(Study)
            .join(Study.series)
            .join(Series.instances)
            .where(Instance.sop_instance_uid == sop["nul"])
        )
        assert study is not None and study.description is None
    assert _warnings(session_factory) == [
        ("nul.dcm", "value-dropped"),
        ("series.dcm", "value-dropped"),
        ("twelve.dcm", "value-dropped"),
        ("twenty.dcm", "value-dropped"),
    ]
    assert "stored with values dropped 4" in report.summary()


def test_a_batch_checks_the_values_of_headers_it_is_given(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    """The receiver hands ingest_batch headers it read itself: they are checked all the same."""
    folder = tmp_path / "spool"
    folder.mkdir()
    items = []
    for n in range(4):
        path = folder / f"{n}.dcm"
        path.write_bytes(dicom_bytes())
        items.append((path, read_header(path, 10**8)))
    items[0] = (items[0][0], dataclasses.replace(items[0][1], accession_number="A" * 17))
    items[1] = (items[1][0], dataclasses.replace(items[1][1], series_description="\udcff"))
    items[2] = (items[2][0], dataclasses.replace(items[2][1], sop_class_uid="1.2.3\0"))

    report = ingest.ingest_batch(
        items, settings=settings, session_factory=session_factory, store=store
    )

    assert (report.stored, dict(report.reasons)) == (3, {"invalid-uid": 1})
    assert [Path(p).name for p in report.warnings] == ["0.dcm", "1.dcm"]
    assert "is 17 characters long, its column holds 16" in report.warnings[str(items[0][0])][0]
    assert "series_description is not valid Unicode text" in report.warnings[str(items[1][0])][0]
    with session_factory() as session:
        assert session.scalars(select(Study.accession_number)).all() == [None, None, None]
        assert set(session.scalars(select(Series.description))) == {None}
    assert _warnings(session_factory) == [("0.dcm", "value-dropped"), ("1.dcm", "value-dropped")]
