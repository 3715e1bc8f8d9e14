"""The Streamlit entry script: find the core service, sign in, then the pages the role allows.

Run it with ``appliance ui`` (or ``appliance up``), which starts Streamlit locked down. The UI
is only a client of the core service; the service checks every request's role and grants.
"""

from __future__ import annotations

from functools import partial

import streamlit as st

from appliance.errors import ServiceError
from ui import session
from ui.safe import md
from ui.views import chat, documents, login, models, users


def main() -> None:
    st.set_page_config(page_title="Document assistant", page_icon=":material/description:")
    service = session.find_service()
    if service is None:
        st.error(session.NOT_RUNNING, icon=":material/error:")
        st.stop()
    try:
        user = session.current_user(service)
    except ServiceError as exc:
        session.show_error(exc)
        st.stop()
    if user is None:
        sign_in = st.Page(partial(login.render, service), title="Sign in", url_path="login")
        st.navigation([sign_in], position="hidden").run()
        return

    api = service.with_session(user.token)
    pages: dict[str, list[st.Page]] = {
        "": [
            st.Page(
                partial(chat.render, api),
                title="Chat",
                icon=":material/chat:",
                url_path="chat",
                default=True,
            )
        ]
    }
    if user.is_admin:
        pages["Admin"] = [
            st.Page(
                partial(documents.render, api),
                title="Documents",
                icon=":material/folder:",
                url_path="documents",
            ),
            st.Page(
                partial(users.render, api), title="Users", icon=":material/group:", url_path="users"
            ),
            st.Page(
                partial(models.render, api),
                title="Models",
                icon=":material/model_training:",
                url_path="models",
            ),
        ]
    page = st.navigation(pages)
    with st.sidebar:
        st.caption(md(f"Signed in as {user.username} ({user.role})"))
        if st.button("Sign out", icon=":material/logout:"):
            session.sign_out(service, user)
            st.rerun()
    try:
        page.run()
    except ServiceError as exc:
        session.show_error(exc)


main()
