"""The UI's link to the core service: finding it, the signed-in user, and errors at the edge.

The session token lives in ``st.session_state`` only. Every rerun checks it with
``GET /auth/me``, so an expired session or a changed role takes effect at once; any call that
answers 401 signs the user out of the UI and shows the sign-in form again.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import streamlit as st

from appliance.api import ServiceClient
from appliance.core.errors import ServiceError
from ui.formatting import error_text
from ui.safe import md

DATA_DIR_ENV = "APPLIANCE_DATA_DIR"
NOT_RUNNING = "The core service is not running: start it with `appliance up`."
EXPIRED = "Your session expired. Please sign in again."

AUTH = "auth.token"
API = "auth.client"
NOTICE = "auth.notice"
FLASH = "ui.flash"


@dataclass(frozen=True)
class User:
    username: str
    role: str
    token: str
    must_change_password: bool = False

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV, "data"))


def find_service() -> ServiceClient | None:
    """The core service of the data folder, or None when none answers."""
    return ServiceClient.find(data_dir())


def current_user(service: ServiceClient) -> User | None:
    """The signed-in user, checked with the service; None when nobody is signed in."""
    token = st.session_state.get(AUTH)
    if not token:
        return None
    try:
        me = service.with_session(token).call("GET", "/auth/me")
    except ServiceError as exc:
        if exc.status == 401:
            forget(EXPIRED)
            return None
        raise
    return User(str(me["username"]), str(me["role"]), token, bool(me.get("must_change_password")))


def use(api: ServiceClient) -> None:
    """Hand the signed-in user's client to this run's page (the entry script calls this)."""
    st.session_state[API] = api


def api() -> ServiceClient:
    """The signed-in user's client, for a page run by the entry script."""
    client = st.session_state.get(API)
    if not isinstance(client, ServiceClient):
        st.stop()  # only the entry script runs pages, after sign-in
    return client


def client_address() -> str:
    """The browser's address, forwarded so the service throttles sign-ins per name and
    address (every request reaches the service from this process, on loopback)."""
    try:
        return str(st.context.ip_address or "")
    except (AttributeError, RuntimeError):  # no browser connection (AppTest)
        return ""


def sign_in(service: ServiceClient, username: str, password: str) -> None:
    body = {"username": username, "password": password, "client": client_address()}
    reply = service.call("POST", "/auth/login", body)
    st.session_state.clear()
    st.session_state[AUTH] = str(reply["session"])


def sign_out(service: ServiceClient, user: User) -> None:
    with contextlib.suppress(ServiceError):  # signed out here either way
        service.with_session(user.token).call("POST", "/auth/logout")
    forget("You are signed out.")


def forget(notice: str | None = None) -> None:
    """Drop everything of the signed-in user from this browser session."""
    st.session_state.clear()
    if notice:
        st.session_state[NOTICE] = notice


def expire() -> NoReturn:
    forget(EXPIRED)
    st.rerun()


def show_error(exc: ServiceError) -> None:
    """A service error as a short message; a 401 sends the user back to sign in."""
    if exc.status == 401:
        expire()
    st.error(md(error_text(exc)), icon=":material/error:")


def call(client: ServiceClient, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """``client.call`` for pages that cannot go on without the answer: a 401 signs out, any
    other service error is shown and ends this run of the page."""
    try:
        return client.call(method, path, body)
    except ServiceError as exc:
        show_error(exc)
        st.stop()


def flash(message: str) -> None:
    """A success message to show after the next rerun."""
    st.session_state[FLASH] = message


def show_flash() -> None:
    message = st.session_state.pop(FLASH, None)
    if message:
        st.success(md(message), icon=":material/check_circle:")
