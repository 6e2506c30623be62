"""Where things live in the object store. Every key is built here and nowhere else.

originals/<study UID>/<series UID>/<SOP instance UID>.<digest>.dcm   the received DICOM, untouched
derived/<study UID>/<task>/v<version>/<name>                 heat maps, masks, reports
models/<task>/v<version>/<name>                              weights and bundles
labels/<study UID>/<task>/<name>                             ground-truth masks
"""

from __future__ import annotations

import re

# DICOM UIDs are digits and dots (PS3.5 9.1); checking here keeps a hostile UID such as
# "../../etc" from ever becoming a path or key.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Hex digits of the SHA-256 in an original's name: 128 bits, so two different files never
# share a name by accident, and the names stay readable.
DIGEST_CHARS = 32


def check_uid(uid: str, what: str = "UID") -> str:
    if len(uid) > 64 or not _UID.fullmatch(uid):
        raise ValueError(
            f"{what} {uid[:80]!r} is not a valid DICOM UID (digits and dots, <= 64 chars)"
        )
    return uid


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"object name {name!r} must be letters, digits, '.', '_' or '-'")
    return name


def original(study_uid: str, series_uid: str, sop_instance_uid: str, sha256: str) -> str:
    """An original's key: its UIDs, and the start of its SHA-256.

    With the digest in the name, a file that reuses an indexed SOP Instance UID with other
    bytes (refused as ``uid-conflict``) is written under a key of its own: not even two
    writers racing each other can overwrite the object an index row points to.
    """
    if not _SHA256.fullmatch(sha256):
        raise ValueError(f"{sha256[:80]!r} is not a SHA-256 hex digest (64 lowercase hex digits)")
    return "originals/{}/{}/{}.{}.dcm".format(
        check_uid(study_uid, "StudyInstanceUID"),
        check_uid(series_uid, "SeriesInstanceUID"),
        check_uid(sop_instance_uid, "SOPInstanceUID"),
        sha256[:DIGEST_CHARS],
    )


def derived(study_uid: str, task: str, version: int, name: str) -> str:
    return f"derived/{check_uid(study_uid)}/{_check_name(task)}/v{version}/{_check_name(name)}"


def label(study_uid: str, task: str, name: str) -> str:
    return f"labels/{check_uid(study_uid)}/{_check_name(task)}/{_check_name(name)}"


def model(task: str, version: int, name: str) -> str:
    return f"models/{_check_name(task)}/v{version}/{_check_name(name)}"
