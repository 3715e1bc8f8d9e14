"""Admin / Models: the chat model that answers, the embedding model, and user feedback."""

from __future__ import annotations

from typing import Any

import streamlit as st

from appliance.api import ServiceClient
from ui import session


def render(api: ServiceClient) -> None:
    st.title("Models")
    info: dict[str, Any] = session.call(api, "GET", "/admin/models")
    active = info.get("active") or {}
    st.subheader("Chat model")
    if not active.get("name"):
        st.warning("No chat model is loaded: the service answers no questions.")
    st.dataframe(
        [
            {"Field": "Name", "Value": active.get("name") or ""},
            {"Field": "Version", "Value": active.get("version") or ""},
            {"Field": "Backend", "Value": active.get("backend") or ""},
            {"Field": "Origin", "Value": active.get("origin") or ""},
        ],
        hide_index=True,
        width="stretch",
    )
    st.subheader("Embedding model")
    st.text(str(info.get("embedding") or "unknown"))

    st.subheader("Feedback")
    feedback = info.get("feedback")
    if feedback is None:
        st.caption("This service keeps no conversations, so it has no feedback.")
        return
    up, down = st.columns(2)
    up.metric("Thumbs up", feedback.get("up", 0))
    down.metric("Thumbs down", feedback.get("down", 0))
    by_model: dict[str, dict[str, int]] = feedback.get("by_model") or {}
    if by_model:
        st.dataframe(
            [
                {"Model": model, "Up": counts.get("up", 0), "Down": counts.get("down", 0)}
                for model, counts in sorted(by_model.items())
            ],
            hide_index=True,
            width="stretch",
        )


if __name__ == "__main__":
    render(session.api())
