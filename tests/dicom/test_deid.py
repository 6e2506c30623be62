"""De-identification (PS3.15 Basic profile): no PHI out, keyed pseudonyms and UIDs consistent."""

from __future__ import annotations

import datetime as dt
import io
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import SecondaryCaptureImageStorage, UltrasoundImageStorage, generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from demo.synthetic import chest_phantom, cxr_dataset
from radflow import ingest
from radflow.db import AuditEvent, Patient, unit_of_work
from radflow.dicom.deid import DeidentificationRefused, Deidentifier, export_study
from radflow.dicom.pseudonym import export_key, pseudonymise
from radflow.settings import Settings
from radflow.store import ObjectStore

SECRET = "test-key"
KEY = export_key(SECRET, "export-test")
PHI = {
    "name": "Doe^Jane",
    "id": "MRN-7734219",
    "birth": "19510317",
    "accession": "ACC99817",
    "institution": "St Elsewhere Hospital",
    "physician": "House^Gregory",
    "date": "20240611",
    "address": "12 Privet Drive",
    "private": "SECRET-VENDOR-NOTE",
}


def _dataset(
    patient_id: str = PHI["id"],
    patient_name: str = PHI["name"],
    study_uid: str | None = None,
    referenced_sop: str | None = None,
) -> Dataset:
    rng = np.random.default_rng(0)
    ds = cxr_dataset(
        chest_phantom(rng, size=64),
        patient_id=patient_id,
        patient_name=patient_name,
        study_uid=study_uid,
        accession=PHI["accession"],
        patient_birth_date=dt.date(1951, 3, 17),
        patient_sex="F",
        study_datetime=dt.datetime(2024, 6, 11, 10, 30),
        institution=PHI["institution"],
    )
    ds.ReferringPhysicianName = PHI["physician"]
    ds.PatientAddress = PHI["address"]
    ds.OtherPatientIDsSequence = Sequence([Dataset()])
    ds.OtherPatientIDsSequence[0].PatientID = PHI["id"]
    ds.OtherPatientIDsSequence[0].TypeOfPatientID = "TEXT"
    block = ds.private_block(0x0011, "ACME 1.0", create=True)
    block.add_new(0x01, "LO", PHI["private"])
    ds.add_new(0x60004000, "LT", f"overlay note for {PHI['name']}")
    if referenced_sop:
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = referenced_sop
        ds.ReferencedImageSequence = Sequence([ref])
    return ds


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _deidentified(ds: Dataset, key: bytes = KEY) -> Dataset:
    # Through bytes, as export does: what is written is what is checked.
    out = Deidentifier(key).dataset(pydicom.dcmread(io.BytesIO(_bytes(ds))))
    return pydicom.dcmread(io.BytesIO(_bytes(out)))


def test_no_phi_remains_in_the_output() -> None:
    original = _dataset(referenced_sop=generate_uid())
    out = _deidentified(original)
    raw = _bytes(out)
    for what, value in PHI.items():
        assert value.encode() not in raw, f"{what} survived de-identification"
    assert b"Doe" not in raw and b"Jane" not in raw
    for uid in (original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID):
        assert uid.encode() not in raw
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert out.DeidentificationMethodCodeSequence[0].CodingSchemeDesignator == "DCM"
    assert "OtherPatientIDsSequence" not in out and "PatientAddress" not in out
    assert not any(element.tag.is_private for element in out.iterall())
    assert 0x60004000 not in out  # overlay comments (60xx,4000): X in the profile
    assert out.StudyDate == "" and out.AccessionNumber == ""
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    # The image itself is untouched.
    assert np.array_equal(out.pixel_array, original.pixel_array)


def test_pseudonyms_are_consistent_per_patient_and_differ_across_patients() -> None:
    first = _deidentified(_dataset(study_uid=generate_uid()))
    second = _deidentified(_dataset(study_uid=generate_uid()))
    other = _deidentified(_dataset(patient_id="MRN-0000001", patient_name="Roe^Richard"))
    assert first.PatientID == second.PatientID == str(first.PatientName)
    assert other.PatientID != first.PatientID
    # Not the pseudonym the database keeps and the dashboard shows: an export cannot be joined
    # with the dashboard by its Patient IDs.
    assert first.PatientID != pseudonymise(PHI["id"], SECRET)
    another = export_key(SECRET, "another-export")
    assert _deidentified(_dataset(), key=another).PatientID != first.PatientID


def test_uids_are_remapped_consistently_and_references_follow() -> None:
    study_uid = generate_uid()
    a = _dataset(study_uid=study_uid)
    b = _dataset(study_uid=study_uid, referenced_sop=a.SOPInstanceUID)
    out_a, out_b = _deidentified(a), _deidentified(b)
    assert out_a.StudyInstanceUID == out_b.StudyInstanceUID != study_uid
    assert out_a.SOPInstanceUID != a.SOPInstanceUID
    assert out_b.ReferencedImageSequence[0].ReferencedSOPInstanceUID == out_a.SOPInstanceUID
    assert out_b.ReferencedImageSequence[0].ReferencedSOPClassUID == a.SOPClassUID  # K
    assert _deidentified(a).SOPInstanceUID == out_a.SOPInstanceUID  # same in every run
    another = export_key(SECRET, "another-export")
    assert _deidentified(a, key=another).SOPInstanceUID != out_a.SOPInstanceUID
    assert re.fullmatch(r"2\.25\.\d+", out_a.SOPInstanceUID) and len(out_a.SOPInstanceUID) <= 64


def test_burned_in_annotation_is_refused() -> None:
    ds = _dataset()
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(DeidentificationRefused, match="burned-in"):
        Deidentifier(KEY).dataset(ds)


@pytest.mark.parametrize(
    ("sop_class", "modality"),
    [(SecondaryCaptureImageStorage, "OT"), (UltrasoundImageStorage, "US"), (None, "ES")],
)
def test_unknown_burned_in_text_on_iods_that_often_carry_it_is_refused(
    sop_class: str | None, modality: str
) -> None:
    """A secondary capture (or an ultrasound, an endoscopy image) that does not say whether text
    is burned into its pixels is treated as "maybe": refused unless explicitly allowed."""
    ds = _dataset()
    if sop_class:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.Modality = modality
    del ds.BurnedInAnnotation
    with pytest.raises(DeidentificationRefused, match="Burned In Annotation absent") as refused:
        Deidentifier(KEY).dataset(ds)
    assert refused.value.reason == "burned-in-unknown"
    assert Deidentifier(KEY, allow_unverified_burned_in=True).dataset(ds).PatientIdentityRemoved
    ds.BurnedInAnnotation = "NO"
    assert Deidentifier(KEY).dataset(ds).PatientIdentityRemoved == "YES"


def test_a_radiograph_without_the_attribute_is_exported() -> None:
    ds = _dataset()
    del ds.BurnedInAnnotation
    assert ds.Modality in ("CR", "DX")
    assert _deidentified(ds).PatientIdentityRemoved == "YES"


def _in_ci() -> bool:
    # Same rule as tests/conftest.py (not importable by name: several conftest modules exist).
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _dciodvfy_errors(path: Path) -> set[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    # Values differ after de-identification; compare the kinds of error, not the values.
    return {re.sub(r"<[^>]*>|\"[^\"]*\"", "", line) for line in lines if line.startswith("Error")}


def test_output_is_as_valid_as_the_input_for_dciodvfy(tmp_path: Path) -> None:
    if shutil.which("dciodvfy") is None:
        if _in_ci():
            pytest.fail("CI=true, so dciodvfy (Debian dicom3tools) must be installed")
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    original = _dataset(referenced_sop=generate_uid())
    before, after = tmp_path / "before.dcm", tmp_path / "after.dcm"
    before.write_bytes(_bytes(original))
    after.write_bytes(_bytes(_deidentified(original)))
    new_errors = _dciodvfy_errors(after) - _dciodvfy_errors(before)
    assert new_errors == set()


def test_export_writes_deidentified_copies_and_logs_no_phi(
    settings: Settings,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    study_uid = generate_uid()
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    first = _dataset(study_uid=study_uid)
    (incoming / "a.dcm").write_bytes(_bytes(first))
    (incoming / "b.dcm").write_bytes(_bytes(_dataset(study_uid=study_uid)))
    (incoming / "bad.dcm").write_bytes(_bytes(first)[:-100])  # truncated: rejected, logged
    ingest.ingest_files(
        ingest.find_files(incoming), settings=settings, session_factory=session_factory, store=store
    )

    secret = settings.pseudonym_key.get_secret_value()
    with unit_of_work(session_factory) as session:
        report = export_study(session, store, study_uid, tmp_path / "out", secret, actor="os:ana")

    assert len(report.written) == 2
    for path in report.written:
        raw = path.read_bytes()
        assert PHI["id"].encode() not in raw and PHI["name"].encode() not in raw
        assert study_uid.encode() not in raw
        assert pydicom.dcmread(path).PatientIdentityRemoved == "YES"
    # The original in the clinical store is untouched.
    assert ingest.find_files(incoming)
    logged = caplog.text
    for value in (PHI["id"], PHI["name"], "Doe", PHI["birth"], PHI["accession"]):
        assert value not in logged


def _ingest(
    settings: Settings, factory: sessionmaker[Session], store: ObjectStore, *sets: Dataset
) -> None:
    folder = Path(settings.data_dir) / "incoming"
    folder.mkdir(parents=True, exist_ok=True)
    for ds in sets:
        (folder / f"{ds.SOPInstanceUID}.dcm").write_bytes(_bytes(ds))
    ingest.ingest_files(
        ingest.find_files(folder), settings=settings, session_factory=factory, store=store
    )


def _patient_ids(report_paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p).PatientID) for p in report_paths}


def test_each_export_has_its_own_key_unless_it_goes_to_the_same_recipient(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    study_uid = generate_uid()
    _ingest(settings, session_factory, store, _dataset(study_uid=study_uid))
    secret = settings.pseudonym_key.get_secret_value()
    ids = {}
    for name, salt in (
        ("a", None),
        ("b", None),
        ("lab1", "recipient-lab"),
        ("lab2", "recipient-lab"),
    ):
        with unit_of_work(session_factory) as session:
            report = export_study(
                session, store, study_uid, tmp_path / name, secret, actor="os:ana", salt=salt
            )
        ids[name] = _patient_ids(report.written)
    with session_factory() as session:
        dashboard = set(session.scalars(select(Patient.pseudonym)))
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == "export")).all()
    assert ids["a"] != ids["b"]  # two exports cannot be joined with each other ...
    assert ids["lab1"] == ids["lab2"]  # ... unless they go to one recipient
    assert not any(exported & dashboard for exported in ids.values())  # nor with the dashboard
    assert [(e.actor, e.object_id) for e in events] == [("os:ana", study_uid)] * 4
    assert events[0].details["destination"] == str((tmp_path / "a").resolve())
    assert events[2].details["salt"] == events[3].details["salt"] == "recipient-lab"
    assert events[0].details["key_id"] != events[1].details["key_id"]
    assert events[2].details["key_id"] == events[3].details["key_id"]
    assert secret not in str([e.details for e in events])


def test_an_override_for_unknown_burned_in_text_is_audited(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, tmp_path: Path
) -> None:
    study_uid = generate_uid()
    capture = _dataset(study_uid=study_uid)
    capture.SOPClassUID = capture.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    del capture.BurnedInAnnotation
    _ingest(settings, session_factory, store, capture)
    secret = settings.pseudonym_key.get_secret_value()
    with unit_of_work(session_factory) as session:
        refused = export_study(session, store, study_uid, tmp_path / "no", secret, actor="os:ana")
    with unit_of_work(session_factory) as session:
        allowed = export_study(
            session,
            store,
            study_uid,
            tmp_path / "yes",
            secret,
            actor="os:ana",
            allow_unverified_burned_in=True,
        )
    assert refused.written == [] and next(iter(refused.refused.values())).startswith(
        "burned-in-unknown"
    )
    assert len(allowed.written) == 1
    with session_factory() as session:
        first, second = session.scalars(
            select(AuditEvent.details).where(AuditEvent.action == "export").order_by(AuditEvent.seq)
        ).all()
    assert first["written"] == 0 and len(first["refused"]) == 1
    assert second["unverified_burned_in"] == [
        str(pydicom.dcmread(allowed.written[0]).SOPInstanceUID)
    ]
