"""Admin / Users: accounts, roles, groups, and which groups may read which collections."""

from __future__ import annotations

from typing import Any

import streamlit as st

from appliance.api import ServiceClient
from appliance.core.errors import ServiceError
from ui import session
from ui.formatting import collection_label, when
from ui.safe import md

ROLES = ("staff", "admin")


def render(api: ServiceClient) -> None:
    st.title("Users")
    session.show_flash()
    users: list[dict[str, Any]] = session.call(api, "GET", "/admin/users")
    access: dict[str, Any] = session.call(api, "GET", "/admin/groups")
    groups: dict[str, list[str]] = access.get("groups") or {}
    collections: list[str] = access.get("collections") or []
    st.dataframe(
        [
            {
                "User": u["username"],
                "Role": u["role"],
                "Status": "disabled" if u.get("disabled") else "active",
                "Groups": ", ".join(u.get("groups") or []),
                "Last sign-in": when(u.get("last_login")),
            }
            for u in users
        ],
        hide_index=True,
        width="stretch",
    )
    add, change, grants = st.tabs(["Add a user", "Change a user", "Groups and access"])
    with add:
        _add_user(api, sorted(groups))
    with change:
        _change_user(api, users, sorted(groups))
    with grants:
        _grants(api, groups, collections)


def _submit(api: ServiceClient, path: str, body: dict[str, Any], done: str) -> None:
    try:
        api.call("POST", path, body)
    except ServiceError as exc:
        session.show_error(exc)
        return
    session.flash(done)
    st.rerun()


def _add_user(api: ServiceClient, known_groups: list[str]) -> None:
    with st.form("add-user", clear_on_submit=True):
        username = st.text_input("Username", help="Letters, digits, . _ @ -")
        password = st.text_input("Password", type="password", help="At least 10 characters.")
        role = st.selectbox("Role", ROLES)
        member_of = st.multiselect(
            "Groups", known_groups, accept_new_options=True, help="Type a name to make a group."
        )
        submitted = st.form_submit_button("Add user", type="primary")
    if not submitted:
        return
    if not username.strip() or not password:
        st.error("Enter a username and a password.")
        return
    body = {"username": username.strip(), "password": password, "role": role, "groups": member_of}
    _submit(api, "/admin/users/create", body, f"Added {username.strip()}.")


def _change_user(api: ServiceClient, users: list[dict[str, Any]], known_groups: list[str]) -> None:
    if not users:
        st.caption("No users yet.")
        return
    by_name = {u["username"]: u for u in users}
    name = st.selectbox("User", list(by_name), key="users.selected")
    if name is None:
        return
    user = by_name[name]
    with st.form(f"change-{name}"):
        role = st.selectbox(
            "Role", ROLES, index=ROLES.index(user["role"]) if user["role"] in ROLES else 0
        )
        disabled = st.checkbox(
            "Disabled (cannot sign in; signed out at once)", value=bool(user.get("disabled"))
        )
        member_of = st.multiselect(
            "Groups",
            sorted({*known_groups, *(user.get("groups") or [])}),
            default=user.get("groups") or [],
            accept_new_options=True,
        )
        password = st.text_input(
            "New password (leave empty to keep it)", type="password", help="Signs the user out."
        )
        submitted = st.form_submit_button("Save changes", type="primary")
    if not submitted:
        return
    body: dict[str, Any] = {"username": name}
    if role != user["role"]:
        body["role"] = role
    if disabled != bool(user.get("disabled")):
        body["disabled"] = disabled
    if sorted(member_of) != sorted(user.get("groups") or []):
        body["groups"] = member_of
    if password:
        body["password"] = password
    if len(body) == 1:
        st.info("Nothing to change.")
        return
    _submit(api, "/admin/users/update", body, f"Saved the changes to {name}.")


def _grants(api: ServiceClient, groups: dict[str, list[str]], collections: list[str]) -> None:
    st.caption(
        "Each subfolder of the documents folder is a collection. Members of a group read the "
        "collections granted to it; files at the top level are shared with every user."
    )
    if groups:
        st.dataframe(
            [
                {"Group": g, "Collections": ", ".join(collection_label(c) for c in granted)}
                for g, granted in groups.items()
            ],
            hide_index=True,
            width="stretch",
        )
    if not collections:
        st.info("There are no collections yet: make subfolders in the documents folder.")
        return
    group = st.selectbox(
        "Group",
        sorted(groups),
        index=None,
        placeholder="Pick or type a group",
        accept_new_options=True,
        key="users.group",
    )
    if not group:
        return
    current = [c for c in groups.get(group, []) if c in collections]
    with st.form(f"grants-{group}"):
        chosen = st.multiselect(md(f"Collections {group} may read"), collections, default=current)
        submitted = st.form_submit_button("Save access", type="primary")
    if not submitted:
        return
    grant = sorted(set(chosen) - set(current))
    revoke = sorted(set(current) - set(chosen))
    if not grant and not revoke:
        st.info("Nothing to change.")
        return
    body = {"group": group, "grant": grant, "revoke": revoke}
    _submit(api, "/admin/grants", body, f"Saved the access of group {group}.")


if __name__ == "__main__":
    render(session.api())
