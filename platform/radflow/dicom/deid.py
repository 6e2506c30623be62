"""De-identification: DICOM PS3.15 Basic Application Level Confidentiality Profile (E.1).

The profile's attribute table (Table E.1-1) comes from ``dicom-anonymizer`` (Kitware), which
encodes it as data per standard release; Radflow applies the actions itself so that

- UIDs (action U) map through a keyed HMAC to ``2.25.<128-bit integer>`` UIDs: the same input UID
  gives the same output UID within an export (references between instances stay consistent),
  and nobody without the key can map back;
- Patient ID and Patient's Name become a keyed pseudonym of the patient: the same patient gets
  the same pseudonym across the studies of an export;
- every nested sequence item is de-identified too, private attributes are removed, and an
  instance that declares burned-in annotation is refused (the Basic profile cannot clean pixels);
  so is one of an IOD that often carries burned-in text (secondary capture, ultrasound, X-ray
  angiography and fluoroscopy, endoscopy and other visible light photography) that does not
  say (Burned In Annotation absent): unknown counts as "maybe", unless the exporting user
  overrides it, which the audit trail records.

Each export has its own key, derived from ``pseudonym_key`` with a salt that is random per
export, or fixed per recipient (radflow.dicom.pseudonym): an export cannot be joined with the
dashboard's pseudonyms, nor with another recipient's export. The export's audit event records
who exported which study where, the salt and the key id.

Where the table gives a choice that depends on the IOD (Z/D, X/Z, X/D, X/Z/D), Radflow takes the
choice that is conformant whatever the attribute's type: a dummy value (D) whenever D is allowed,
else an empty value (Z). Dates and times are not kept (no Retain Longitudinal option).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import io
import logging
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pydicom
from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from radflow.db import Series, Study
from radflow.db.audit import record
from radflow.dicom import as_text
from radflow.dicom.pseudonym import export_key, key_id, keyed_pseudonym, new_export_salt
from radflow.errors import RadflowError
from radflow.store import ObjectStore

logger = logging.getLogger(__name__)

# The standard release the table is taken from (a module of dicom-anonymizer).
TABLE_RELEASE = "dicomfields_2026c"
PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
# De-identification Method is LO (64 characters a value), hence two values.
METHOD = [
    "DICOM PS3.15 E.1 Basic Profile (Table E.1-1, 2026c)",
    "Radflow keyed UIDs and pseudonyms",
]


class Action(enum.Enum):
    REMOVE = "X"
    EMPTY = "Z"
    DUMMY = "D"
    UID = "U"
    CLEAN_REFERENCES = "X/Z/U*"  # keep the sequence; its UIDs are replaced (U) inside


# Table categories -> the action Radflow applies (see the module docstring for the choices).
_CATEGORY_ACTIONS = {
    "X_TAGS": Action.REMOVE,
    "Z_TAGS": Action.EMPTY,
    "D_TAGS": Action.DUMMY,
    "U_TAGS": Action.UID,
    "Z_D_TAGS": Action.DUMMY,
    "X_Z_TAGS": Action.EMPTY,
    "X_D_TAGS": Action.DUMMY,
    "X_Z_D_TAGS": Action.DUMMY,
    "X_Z_U_STAR_TAGS": Action.CLEAN_REFERENCES,
}

_PATIENT_NAME = 0x00100010
_PATIENT_ID = 0x00100020

# Dummy values per VR: valid for the VR, meaningless, and the same for every instance.
_DUMMY_TEXT = "ANONYMIZED"
_DUMMY_BY_VR: dict[str, object] = {
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "AS": "000Y",
    "DS": "0",
    "IS": "0",
    "UR": "",
    "FL": 0.0,
    "FD": 0.0,
    "SL": 0,
    "SS": 0,
    "UL": 0,
    "US": 0,
    "SV": 0,
    "UV": 0,
    "OB": b"\x00\x00",
    "OW": b"\x00\x00",
    "UN": b"\x00\x00",
}


# IODs that often carry text burned into the pixels (PS3.3 Burned In Annotation, C.7.6.1.1.7):
# by SOP Class UID prefix, and by Modality for anything else that says what it is.
_BURNED_IN_PRONE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture (and its multi-frame variants)
    "1.2.840.10008.5.1.4.1.1.6.",  # Ultrasound (image, enhanced volume)
    "1.2.840.10008.5.1.4.1.1.3.",  # Ultrasound multi-frame
    "1.2.840.10008.5.1.4.1.1.12.",  # X-ray angiography and radiofluoroscopy
    "1.2.840.10008.5.1.4.1.1.77.1",  # Visible light: endoscopy, microscopy, photography
)
_BURNED_IN_PRONE_MODALITIES = frozenset({"SC", "US", "XA", "RF", "ES", "XC", "GM", "OP", "SM"})


class DeidentificationRefused(RadflowError):
    """An instance the Basic profile cannot make safe (e.g. text burned into the pixels)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ProfileTable:
    exact: dict[int, Action]
    # (group, element, group mask, element mask) ranges such as overlays (60xx) and curves (50xx)
    masked: tuple[tuple[int, int, int, int, Action], ...]

    def action(self, tag: BaseTag) -> Action | None:
        found = self.exact.get(int(tag))
        if found is not None:
            return found
        for group, element, group_mask, element_mask, action in self.masked:
            if tag.group & group_mask == group and tag.element & element_mask == element:
                return action
        return None


@cache
def profile_table() -> ProfileTable:
    """Table E.1-1 as Radflow applies it (immutable; loaded once per process)."""
    categories = dicom_anonymization_database_selector(TABLE_RELEASE)
    exact: dict[int, Action] = {}
    masked: list[tuple[int, int, int, int, Action]] = []
    for category, action in _CATEGORY_ACTIONS.items():
        for entry in categories[category]:
            if len(entry) == 2:
                exact[(entry[0] << 16) | entry[1]] = action
            else:
                group, element, group_mask, element_mask = entry
                masked.append(
                    (group & group_mask, element & element_mask, group_mask, element_mask, action)
                )
    return ProfileTable(exact, tuple(masked))


def burned_in_unknown(ds: Dataset) -> bool:
    """An IOD that often carries burned-in text, without Burned In Annotation saying "NO"."""
    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "NO":
        return False
    sop_class = str(ds.get("SOPClassUID", "") or "")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    return sop_class.startswith(_BURNED_IN_PRONE_CLASSES) or modality in _BURNED_IN_PRONE_MODALITIES


@dataclass(frozen=True)
class Deidentifier:
    """Applies the profile with one derived key (radflow.dicom.pseudonym.export_key).

    ``allow_unverified_burned_in`` exports instances whose burned-in text is unknown (see the
    module doc); the caller records that it was asked for.
    """

    key: bytes
    table: ProfileTable = field(default_factory=profile_table)
    allow_unverified_burned_in: bool = False

    def uid(self, uid: str) -> str:
        """The keyed replacement of ``uid``: consistent, and without the key not reversible."""
        digest = hmac.new(self.key, b"uid:" + uid.strip().encode(), hashlib.sha256)
        return f"2.25.{int.from_bytes(digest.digest()[:16], 'big')}"

    def patient_pseudonym(self, patient_id: str) -> str:
        return keyed_pseudonym(patient_id or "(no patient id)", self.key)

    def dataset(self, ds: Dataset) -> Dataset:
        """De-identify ``ds`` in place (and its file meta); return it."""
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            raise DeidentificationRefused(
                "burned-in-annotation",
                "the instance declares burned-in annotation (text in the pixels), which the "
                "Basic profile cannot remove; leave it out of the export or clean it by hand",
            )
        if not self.allow_unverified_burned_in and burned_in_unknown(ds):
            raise DeidentificationRefused(
                "burned-in-unknown",
                f"a {ds.get('Modality', '') or 'secondary capture'} instance that does not say "
                "whether text is burned into its pixels (Burned In Annotation absent): check "
                "the images, then export with --allow-unverified-burned-in (recorded in the "
                "audit trail)",
            )
        pseudonym = self.patient_pseudonym(as_text(ds.get("PatientID")))
        self._clean(ds)
        ds.remove_private_tags()
        ds.PatientID = pseudonym
        ds.PatientName = pseudonym
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = METHOD
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = PROFILE_CODE
        ds.DeidentificationMethodCodeSequence = Sequence([code])
        ds.LongitudinalTemporalInformationModified = "REMOVED"
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            if "MediaStorageSOPInstanceUID" in meta:
                meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            for tag in [t for t in meta.keys() if int(t) not in _KEEP_META]:  # noqa: SIM118
                del meta[tag]
        return ds

    def _clean(self, ds: Dataset) -> None:
        for element in list(ds):
            if element.tag.is_private:
                continue  # removed whole afterwards
            action = self.table.action(element.tag)
            if int(element.tag) in (_PATIENT_NAME, _PATIENT_ID):
                continue  # replaced by the pseudonym
            if action is Action.REMOVE:
                del ds[element.tag]
                continue
            if action is not None:
                self._apply(ds, element, action)
            if element.tag in ds and ds[element.tag].VR == "SQ":
                for item in ds[element.tag].value:
                    self._clean(item)

    def _apply(self, ds: Dataset, element: DataElement, action: Action) -> None:
        vr = element.VR
        if vr == "SQ":
            if action is Action.EMPTY:
                ds[element.tag].value = Sequence()
            return  # D, U and X/Z/U* keep the sequence; its items are cleaned by _clean
        if action is Action.EMPTY:
            ds[element.tag].value = b"" if vr in ("OB", "OW", "UN") else None
        elif action is Action.UID or vr == "UI":
            ds[element.tag].value = self._uids(element.value)
        elif element.value not in (None, "", b""):  # DUMMY (an empty value stays empty)
            ds[element.tag].value = _DUMMY_BY_VR.get(vr, _DUMMY_TEXT)

    def _uids(self, value: object) -> object:
        if isinstance(value, MultiValue | list):
            return [self.uid(str(v)) for v in value]
        return self.uid(str(value)) if value else value


# File meta attributes rebuilt or kept on write; everything else (source AE titles, private
# information) is dropped.
_KEEP_META = frozenset(
    {
        0x00020001,  # File Meta Information Version
        0x00020002,  # Media Storage SOP Class UID
        0x00020003,  # Media Storage SOP Instance UID (remapped above)
        0x00020010,  # Transfer Syntax UID
        0x00020012,  # Implementation Class UID
        0x00020013,  # Implementation Version Name
    }
)


def deidentify_bytes(data: bytes, deidentifier: Deidentifier) -> Dataset:
    """The de-identified dataset of one Part 10 file."""
    ds = pydicom.dcmread(io.BytesIO(data))
    return deidentifier.dataset(ds)


@dataclass
class ExportReport:
    key_id: str
    salt: str
    written: list[Path] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # de-identified SOP UID -> reason
    unverified_burned_in: list[str] = field(default_factory=list)
    """De-identified SOP UIDs exported by override although their burned-in text is unknown."""


def export_study(
    session: Session,
    store: ObjectStore,
    study_uid: str,
    out_dir: Path,
    secret: str,
    *,
    actor: str,
    salt: str | None = None,
    allow_unverified_burned_in: bool = False,
) -> ExportReport:
    """Write de-identified copies of every instance of a study under ``out_dir``; audited.

    Files land in ``<new study UID>/<new series UID>/<new SOP instance UID>.dcm``; the originals
    stay only in the clinical store. ``secret`` is ``pseudonym_key``; ``salt`` selects the
    export's key (default: a new random one, so this export joins with nothing else).
    The audit event joins the caller's transaction: commit it.
    """
    study = session.scalar(
        select(Study)
        .where(Study.study_uid == study_uid)
        .options(selectinload(Study.series).selectinload(Series.instances))
    )
    if study is None:
        raise LookupError("no study with that Study Instance UID; see `radflow status`")
    salt = salt or new_export_salt()
    key = export_key(secret, salt)
    deidentifier = Deidentifier(key, allow_unverified_burned_in=allow_unverified_burned_in)
    report = ExportReport(key_id=key_id(key), salt=salt)
    for series in study.series:
        for instance in series.instances:
            new_sop = deidentifier.uid(instance.sop_instance_uid)
            try:
                ds = deidentify_bytes(store.get_bytes(instance.object_key), deidentifier)
            except DeidentificationRefused as exc:
                report.refused[new_sop] = f"{exc.reason}: {exc}"
                logger.warning("study %s: instance not exported: %s", study.id, exc)
                continue
            if burned_in_unknown(ds):
                report.unverified_burned_in.append(new_sop)
            target = (
                out_dir / deidentifier.uid(study.study_uid) / deidentifier.uid(series.series_uid)
            )
            target.mkdir(parents=True, exist_ok=True)
            path = target / f"{new_sop}.dcm"
            ds.save_as(path, enforce_file_format=True)
            report.written.append(path)
    session.add(
        record(
            actor,
            "export",
            "study",
            study_uid,
            destination=str(out_dir.resolve()),
            key_id=report.key_id,
            salt=salt,
            written=len(report.written),
            refused=report.refused,
            unverified_burned_in=report.unverified_burned_in,
        )
    )
    logger.info("study %s: exported %d de-identified instances", study.id, len(report.written))
    return report
