"""The Streamlit entry script: find the core service, sign in, then the pages the role allows.

Run it with ``appliance ui`` (or ``appliance up``), which starts Streamlit locked down. The UI
is only a client of the core service, and the service checks the role and the collection
grants of every request: hiding the admin pages from staff is a convenience, not the control.
"""

from __future__ import annotations

from functools import partial

import streamlit as st

from appliance.core.errors import ServiceError
from appliance.core.offline import enforce_offline
from ui import session
from ui.safe import md
from ui.views import login


def main() -> None:
    # The UI process is offline too: loopback only (the core service), nothing else.
    enforce_offline()
    # No page_icon and no st.Page icons: Streamlit turns them into a favicon fetched from a
    # public CDN (fonts.gstatic.com), which an offline appliance must never reach for.
    st.set_page_config(page_title="Document assistant")
    service = session.find_service()
    if service is None:
        st.error(session.NOT_RUNNING)
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

    if user.must_change_password:
        change = st.Page(
            partial(login.change_password, service, user), title="New password", url_path="password"
        )
        st.navigation([change], position="hidden").run()
        return

    pages = {"": [st.Page("views/chat.py", title="Chat", url_path="chat", default=True)]}
    if user.is_admin:
        pages["Admin"] = [
            st.Page("views/documents.py", title="Documents"),
            st.Page("views/users.py", title="Users"),
            st.Page("views/models.py", title="Models"),
            st.Page("views/finetune.py", title="Fine-tuning", url_path="finetune"),
        ]
    page = st.navigation(pages)
    with st.sidebar:
        st.caption(md(f"Signed in as {user.username} ({user.role})"))
        if st.button("Sign out"):
            session.sign_out(service, user)
            st.rerun()
    session.use(service.with_session(user.token))
    try:
        page.run()
    except ServiceError as exc:
        session.show_error(exc)


main()
