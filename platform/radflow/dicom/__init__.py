"""DICOM reading, validation, pixel decoding and synthetic data."""

from __future__ import annotations

from pydicom.multival import MultiValue


def as_text(value: object) -> str:
    """A DICOM string value as the standard writes it: several values joined by backslashes.

    pydicom splits a string at each backslash into a MultiValue, whose ``str()`` is a Python
    list (``['%_%', '']``); a sender's backslash in a single-valued element must come back as
    the backslash it sent. None (absent) is "".
    """
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(as_text(v) for v in value)
    return str(value)
