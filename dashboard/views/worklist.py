"""Worklist: every study in triage order (flagged first), filtered and paged; a row opens it."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, time, timedelta

import pandas as pd
import streamlit as st

from dashboard import context, text
from radflow.services.review import next_unreviewed
from radflow.services.users import Permission
from radflow.services.worklist import (
    WorklistFilter,
    WorklistRow,
    WorklistSort,
    count_studies,
    filter_choices,
    list_studies,
    status_counts,
)

user = context.require_page(Permission.VIEW_STUDIES)

SORTS: dict[str, tuple[WorklistSort, bool]] = {
    "Triage priority": ("priority", True),
    "Highest score first": ("score", True),
    "Newest first": ("received", True),
    "Oldest first": ("received", False),
}
PAGE_SIZES = (25, 50, 100)
ALL = "all"
REVIEWED = {ALL: None, "Not reviewed": False, "Reviewed": True}

COLUMNS = {
    "flagged": st.column_config.CheckboxColumn(
        "Flagged", help="Latest score at or above the model's operating threshold", width="small"
    ),
    "accession": st.column_config.TextColumn("Accession"),
    "patient": st.column_config.TextColumn("Patient (pseudonym)"),
    "modality": st.column_config.TextColumn("Modality", width="small"),
    "status": st.column_config.TextColumn("Status"),
    "score": st.column_config.ProgressColumn(
        "Score", format="%.3f", min_value=0.0, max_value=1.0, help="Latest model score"
    ),
    "threshold": st.column_config.NumberColumn("Threshold", format="%.3f"),
    "model": st.column_config.TextColumn("Model"),
    "received_at": st.column_config.DatetimeColumn("Received", format="YYYY-MM-DD HH:mm"),
    "status_reason": st.column_config.TextColumn("Reason", help="Why it failed or has no model"),
}


def _frame(rows: list[WorklistRow]) -> pd.DataFrame:
    return text.table(
        pd.DataFrame(
            [{name: getattr(row, name) for name in COLUMNS} for row in rows], columns=list(COLUMNS)
        )
    )


def _day_range(value: object) -> tuple[datetime | None, datetime | None]:
    days = [
        d for d in (value if isinstance(value, tuple | list) else [value]) if isinstance(d, date)
    ]
    if not days:
        return None, None
    start = datetime.combine(days[0], time.min, tzinfo=UTC)
    end = datetime.combine(days[-1], time.min, tzinfo=UTC) + timedelta(days=1)
    return start, end


def _open(study_uid: str) -> None:
    st.switch_page(context.STUDY_PAGE, query_params={context.STUDY_PARAM: study_uid})


header, action = st.columns([4, 1], vertical_alignment="bottom")
header.title("Worklist")

with context.session() as session:
    counts = status_counts(session)
    choices = filter_choices(session)

if not any(counts.values()):
    settings = context.runtime().settings
    st.info(
        f"No studies yet: send a study to DICOM port {settings.receiver_port} "
        f"(AE title {settings.receiver_ae_title}), drop files in `{settings.inbox}`, "
        "or run `radflow ingest DIR`.",
        icon=":material/inbox:",
    )
    st.stop()

if user.can(Permission.REVIEW) and action.button(
    "Next unreviewed", icon=":material/skip_next:", type="primary", help="Most urgent unreviewed"
):
    with context.session() as session:
        upcoming = next_unreviewed(session)
    if upcoming is None:
        st.toast("Every scored study has been reviewed.")
    else:
        _open(upcoming)

for column, (name, n) in zip(st.columns(len(counts)), counts.items(), strict=True):
    column.metric(name.replace("_", " ").capitalize(), n)

# persist_state="session": going to a study and back keeps the sort, filters and page.
controls = st.columns([2, 2, 2, 1])
search = controls[0].text_input(
    "Search", placeholder="Accession or patient pseudonym", key="search", persist_state="session"
)
sort_label = controls[1].selectbox("Sort", list(SORTS), key="sort", persist_state="session")
status = controls[2].selectbox(
    "Status",
    [ALL, *counts],
    format_func=lambda s: "All statuses" if s == ALL else s.replace("_", " ").capitalize(),
    key="status",
    persist_state="session",
)
page_size = controls[3].selectbox(
    "Rows per page", PAGE_SIZES, index=1, key="size", persist_state="session"
)
with st.expander("More filters"):
    more = st.columns(5)
    task = more[0].selectbox("Task", [ALL, *choices.tasks], key="task", persist_state="session")
    modality = more[1].selectbox(
        "Modality", [ALL, *choices.modalities], key="modality", persist_state="session"
    )
    reviewed = more[2].selectbox(
        "Reviewed", list(REVIEWED), key="reviewed", persist_state="session"
    )
    model = more[3].selectbox(
        "Model version",
        [ALL, *choices.models],
        format_func=lambda m: "All models" if m == ALL else choices.models[int(m)],
        key="model",
        persist_state="session",
    )
    received = more[4].date_input("Received between", value=[], key="received")

received_from, received_until = _day_range(received)
where = WorklistFilter(
    status=None if status == ALL else status,
    task=None if task == ALL else task,
    modality=None if modality == ALL else modality,
    received_from=received_from,
    received_until=received_until,
    reviewed=REVIEWED[reviewed or ALL],
    model_version_id=None if model == ALL else int(model),
    search=search or None,
)
sort, descending = SORTS[sort_label or "Triage priority"]

with context.session() as session:
    matching = count_studies(session, where)
pages = max(1, math.ceil(matching / page_size))
table = st.container()
# One page widget per sort/filter/size, so changing any of them starts again at page 1.
page = st.pagination(pages, key=f"page:{sort_label}:{where}:{page_size}")

with context.session() as session:
    rows, _ = list_studies(
        session,
        sort=sort,
        descending=descending,
        where=where,
        limit=page_size,
        offset=(page - 1) * page_size,
        count=False,
    )

with table:
    if not rows:
        st.info("No studies match these filters.", icon=":material/filter_alt_off:")
    else:
        first = (page - 1) * page_size + 1
        st.caption(
            f"Studies {first}–{first + len(rows) - 1} of {matching}. Select a row to open it."
        )
        selection = st.dataframe(
            _frame(rows),
            column_config=COLUMNS,
            hide_index=True,
            on_select="rerun",
            selection_mode="single-row",
            key="worklist_table",
        )
        if selection.selection.rows:
            _open(rows[selection.selection.rows[0]].study_uid)
