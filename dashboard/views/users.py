"""Users (admins): accounts, roles, deactivation, password resets and login waits; all audited."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import pandas as pd
import streamlit as st
from sqlalchemy.orm import Session

from dashboard import context, text
from radflow.errors import RadflowError
from radflow.services.users import (
    PasswordPolicy,
    Permission,
    Role,
    add_user,
    change_role,
    list_users,
    reset_password,
    set_active,
    temporary_password,
    unlock,
)

user = context.require_page(Permission.MANAGE_USERS)
policy = PasswordPolicy.from_settings(context.runtime().settings)
SHOWN_ONCE = "radflow_temporary_password"


def _run(action: Callable[[Session], object], done: str) -> None:
    try:
        with context.transaction() as session:
            action(session)
    except (RadflowError, ValueError) as exc:
        st.error(str(exc))
        return
    st.toast(done)
    st.rerun()


st.title("Users")
shown = st.session_state.pop(SHOWN_ONCE, None)
if shown:
    name, password = shown
    st.success(
        f"Temporary password of {name} (shown once; they choose their own at first login):",
        icon=":material/key:",
    )
    st.code(password, language=None)

with context.session() as session:
    rows = list_users(session, user)
st.dataframe(
    text.table(pd.DataFrame([asdict(r) for r in rows])),
    hide_index=True,
    column_config={
        "name": "User",
        "role": "Role",
        "active": st.column_config.CheckboxColumn("Active"),
        "must_change_password": st.column_config.CheckboxColumn("Must change password"),
        "created_at": st.column_config.DatetimeColumn("Created", format="YYYY-MM-DD HH:mm"),
        "throttled": st.column_config.CheckboxColumn(
            "Waiting", help="Wrong passwords: a client must wait before trying again"
        ),
    },
)

left, right = st.columns(2)
with left:
    st.subheader("Change an account")
    chosen = st.selectbox("User", [r.name for r in rows], key="users_chosen")
    row = next((r for r in rows if r.name == chosen), None)
    if row is not None:
        new_role = st.selectbox(
            "Role", [r.value for r in Role], index=[r.value for r in Role].index(row.role)
        )
        buttons = st.columns(4)
        if buttons[0].button("Change role", disabled=new_role == row.role):
            _run(lambda s: change_role(s, user, row.name, new_role), f"{row.name}: {new_role}")
        if buttons[1].button("Reactivate" if not row.active else "Deactivate"):
            _run(lambda s: set_active(s, user, row.name, not row.active), f"{row.name} changed")
        if buttons[2].button("Reset password"):

            def _reset(s: Session) -> None:
                password = reset_password(s, user, row.name, policy=policy)
                st.session_state[SHOWN_ONCE] = (row.name, password)

            _run(_reset, f"Password of {row.name} reset")
        if buttons[3].button("Unlock", disabled=not row.throttled):
            _run(lambda s: unlock(s, user, row.name), f"Login waits of {row.name} cleared")

with right:
    st.subheader("Add a user")
    with st.form("add_user", clear_on_submit=True):
        name = st.text_input("User name", max_chars=64)
        role = st.selectbox("Role", [r.value for r in Role], key="add_role")
        add = st.form_submit_button("Add user", type="primary")
    if add and name:

        def _add(s: Session) -> None:
            password = temporary_password()
            add_user(s, name, role, password, actor=user, policy=policy, must_change_password=True)
            st.session_state[SHOWN_ONCE] = (name, password)

        _run(_add, f"Added {name}")
