"""The sign-in form."""

from __future__ import annotations

import streamlit as st

from appliance.api import ServiceClient
from appliance.core.errors import ServiceError
from ui import session
from ui.formatting import error_text
from ui.safe import md


def render(service: ServiceClient) -> None:
    st.title("Sign in")
    notice = st.session_state.get(session.NOTICE)
    if notice:
        st.info(md(notice), icon=":material/info:")
    with st.form("login"):
        username = st.text_input("Username", autocomplete="username", key="login.username")
        password = st.text_input(
            "Password", type="password", autocomplete="current-password", key="login.password"
        )
        submitted = st.form_submit_button("Sign in", type="primary")
    if not submitted:
        return
    if not username.strip() or not password:
        st.error("Enter your username and password.")
        return
    try:
        session.sign_in(service, username.strip(), password)
    except ServiceError as exc:
        st.error(md(error_text(exc)), icon=":material/error:")
        return
    st.rerun()


def change_password(service: ServiceClient, user: session.User) -> None:
    """The only page of an account whose password must be changed first."""
    st.title("Choose a new password")
    st.info(
        "Your password was set for a first sign-in. Choose your own before you go on.",
        icon=":material/lock_reset:",
    )
    with st.form("password"):
        old = st.text_input(
            "Current password", type="password", autocomplete="current-password", key="pw.old"
        )
        new = st.text_input(
            "New password", type="password", autocomplete="new-password", key="pw.new"
        )
        again = st.text_input(
            "New password again", type="password", autocomplete="new-password", key="pw.again"
        )
        submitted = st.form_submit_button("Change password", type="primary")
    if not submitted:
        return
    if new != again:
        st.error("The new passwords do not match.")
        return
    try:
        service.with_session(user.token).call("POST", "/auth/password", {"old": old, "new": new})
    except ServiceError as exc:
        st.error(md(error_text(exc)), icon=":material/error:")
        return
    st.rerun()
