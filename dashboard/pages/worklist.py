"""Worklist: every study with its latest score, most urgent first; selecting a row opens it."""

from __future__ import annotations

import math

import pandas as pd
import streamlit as st

from dashboard import context
from radflow.services.worklist import WorklistRow, WorklistSort, list_studies, status_counts

SORTS: dict[str, tuple[WorklistSort, bool]] = {
    "Highest score first": ("score", True),
    "Lowest score first": ("score", False),
    "Newest first": ("received", True),
    "Oldest first": ("received", False),
}
PAGE_SIZES = (25, 50, 100)
ALL = "all"

COLUMNS = {
    "accession": st.column_config.TextColumn("Accession"),
    "patient": st.column_config.TextColumn("Patient"),
    "modality": st.column_config.TextColumn("Modality", width="small"),
    "status": st.column_config.TextColumn("Status"),
    "score": st.column_config.ProgressColumn(
        "Score", format="%.3f", min_value=0.0, max_value=1.0, help="Latest model score"
    ),
    "flagged": st.column_config.CheckboxColumn(
        "Flagged", help="Score at or above the model's threshold"
    ),
    "model": st.column_config.TextColumn("Model"),
    "received_at": st.column_config.DatetimeColumn("Received", format="YYYY-MM-DD HH:mm"),
    "status_reason": st.column_config.TextColumn("Reason"),
}


def _frame(rows: list[WorklistRow]) -> pd.DataFrame:
    return pd.DataFrame(
        [{name: getattr(row, name) for name in COLUMNS} for row in rows], columns=list(COLUMNS)
    )


st.title("Worklist")

with context.session() as session:
    counts = status_counts(session)

if not any(counts.values()):
    inbox = context.runtime().settings.inbox
    st.info(
        f"No studies yet: run `radflow ingest DIR` or drop files in `{inbox}`.",
        icon=":material/inbox:",
    )
    st.stop()

for column, (name, n) in zip(st.columns(len(counts)), counts.items(), strict=True):
    column.metric(name.replace("_", " ").capitalize(), n)

# persist_state="session": going to a study and back keeps the sort, filter and page.
controls = st.columns([2, 2, 1])
sort_label = controls[0].selectbox("Sort", list(SORTS), key="sort", persist_state="session")
status = controls[1].selectbox(
    "Status",
    [ALL, *counts],
    format_func=lambda s: "All statuses" if s == ALL else s.replace("_", " ").capitalize(),
    key="status",
    persist_state="session",
)
page_size = controls[2].selectbox(
    "Rows per page", PAGE_SIZES, index=1, key="size", persist_state="session"
)

status_filter = None if status == ALL else status
matching = sum(counts.values()) if status_filter is None else counts[status_filter]
pages = max(1, math.ceil(matching / page_size))

table = st.container()
# One page widget per sort/filter/size, so changing any of them starts again at page 1.
page = st.pagination(pages, key=f"page:{sort_label}:{status}:{page_size}", persist_state="session")

sort, descending = SORTS[sort_label or "Highest score first"]
with context.session() as session:
    rows, total = list_studies(
        session,
        sort=sort,
        descending=descending,
        status=status_filter,
        limit=page_size,
        offset=(page - 1) * page_size,
    )

with table:
    if not rows:
        st.info(f"No studies with status {status_filter!r}.")
    else:
        first = (page - 1) * page_size + 1
        st.caption(f"Studies {first}–{first + len(rows) - 1} of {total}. Select a row to open it.")
        selection = st.dataframe(
            _frame(rows),
            column_config=COLUMNS,
            hide_index=True,
            on_select="rerun",
            selection_mode="single-row",
            key="worklist_table",
        )
        if selection.selection.rows:
            chosen = rows[selection.selection.rows[0]]
            st.switch_page(context.STUDY_PAGE, query_params={context.STUDY_PARAM: chosen.study_uid})
