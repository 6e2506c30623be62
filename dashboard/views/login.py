"""Log in: the only page anybody sees before a password was checked."""

from __future__ import annotations

import streamlit as st

from dashboard import context
from radflow.services.users import LoginFailed, TooManyAttempts, authenticate

if st.session_state.get(context.AUTH_KEY):  # app.py checked it this run: already logged in
    # A link to a study (/study?study=UID) opened before login leads to that study after it.
    linked = st.query_params.get(context.STUDY_PARAM)
    if linked:
        st.switch_page(context.STUDY_PAGE, query_params={context.STUDY_PARAM: linked})
    st.switch_page(context.WORKLIST_PAGE)

st.title("Radflow")
st.caption("Imaging AI review. Log in with the account an administrator created for you.")

notice = st.session_state.pop(context.NOTICE_KEY, None)
if notice:
    st.info(notice)

with st.form("login", enter_to_submit=True):
    name = st.text_input("User name", autocomplete="username")
    password = st.text_input("Password", type="password", autocomplete="current-password")
    submitted = st.form_submit_button("Log in", type="primary")

if submitted:
    try:
        # Committed even when the password is wrong: the failed attempt must count.
        with context.transaction() as session:
            try:
                principal = authenticate(
                    session,
                    context.runtime().settings,
                    name,
                    password,
                    client=context.client_address(),
                )
            except LoginFailed as exc:
                failure: Exception | None = exc
            else:
                failure = None
    except TooManyAttempts as exc:
        st.error(str(exc))
    else:
        if failure is not None:
            st.error(str(failure))
        else:
            context.sign_in(principal)
            st.rerun()
