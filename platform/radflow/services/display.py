"""Untrusted text (DICOM values, URL parameters, file names) made safe to show as it is stored.

Unicode bidirectional controls reorder what follows them on screen: an Accession Number
``AC<U+202E>9876`` displays as ``AC6789``. Control and invisible characters are shown as
visible escapes instead, so what a reviewer reads is what the database holds. (Rendering as
plain text, never as Markdown or HTML, is the dashboard's part: dashboard/text.py.)
"""

from __future__ import annotations

import re

# Bidi embeddings, overrides and isolates, the directional marks, zero-width characters and
# the byte order mark; and C0/C1 control characters (tab and newline are shown as they are).
_INVISIBLE = re.compile(
    "[\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff\x00-\x08\x0b-\x1f\x7f-\x9f]"
)


def visible(value: object) -> str:
    """``value`` as text, every invisible or reordering character written as ``⟨U+XXXX⟩``."""
    text = "" if value is None else str(value)
    return _INVISIBLE.sub(lambda m: f"⟨U+{ord(m.group()):04X}⟩", text)
