"""Showing untrusted text (DICOM values, URL parameters, file names): as plain text, always.

Streamlit renders titles, captions, alerts and image captions as Markdown, where an Accession
``:red[NORMAL]`` becomes a red word, ``![x](http://host/p.png)`` makes the browser fetch from
another host and a bare URL becomes a link; backslash escapes do not stop all of these. So a
value that came from outside is never put into a Markdown element: headings and captions that
hold one are HTML with the value escaped (``st.html`` renders no Markdown), alerts say what
happened in Radflow's own words with the value beside them as plain text, and every value is
passed through ``radflow.services.display.visible`` first (bidirectional controls escaped).
"""

from __future__ import annotations

import html

import pandas as pd
import streamlit as st

from radflow.services.display import visible

_TITLE = "font-size:2.75rem;font-weight:700;line-height:1.2;margin:0;padding:1.25rem 0 1rem"
_CAPTION = "font-size:0.875rem;color:rgba(49,51,63,0.6);margin:0;overflow-wrap:anywhere"


def plain(value: object) -> str:
    """For places Streamlit shows as plain text: tables, select options, st.text."""
    return visible(value)


def title(text: object) -> None:
    st.html(f'<h1 style="{_TITLE}">{html.escape(visible(text))}</h1>')


def caption(text: object) -> None:
    st.html(f'<p style="{_CAPTION}">{html.escape(visible(text))}</p>')


def table(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every text cell passed through ``visible``."""
    out = frame.copy()
    for column in out.columns:
        if pd.api.types.is_string_dtype(out[column]) or out[column].dtype == object:
            out[column] = out[column].map(lambda v: visible(v) if isinstance(v, str) else v)
    return out
