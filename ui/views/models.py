"""Admin / Models: the chat model that answers, the embedding model, and user feedback."""

from __future__ import annotations

from typing import Any

import streamlit as st

from appliance.api import ServiceClient
from appliance.core.audience import describe
from ui import session
from ui.safe import md


def _gate_summary(version: dict[str, Any]) -> str:
    gate = version.get("gate") or {}
    if not gate:
        return ""
    parts = []
    for name, sides in (gate.get("metrics") or {}).items():
        cand = sides.get("candidate") or {}
        ref = sides.get("reference") or {}
        for metric in ("answer_f1", "answer_containment"):
            if metric in cand:
                parts.append(f"{name} {metric} {ref.get(metric, 0):.2f}→{cand[metric]:.2f}")
    verdict = "passed" if gate.get("passed") else "rejected"
    return verdict + (": " + ", ".join(parts) if parts else "")


def _versions(api: ServiceClient, versions: list[dict[str, Any]]) -> None:
    st.subheader("Model versions")
    if not versions:
        st.caption("No model registry yet: it is created when the service first loads a model.")
        return
    st.dataframe(
        [
            {
                "Version": v.get("version"),
                "Active": "●" if v.get("active") else "",
                "Created": v.get("created") or "",
                "Run": v.get("run_id") or "",
                # who it may answer: users granted every collection it was trained on
                "Trained on": describe(v.get("audience")),
                "Gate": _gate_summary(v),
                "GGUF": v.get("gguf") or "",
            }
            for v in versions
        ],
        hide_index=True,
        width="stretch",
    )
    names = [str(v["version"]) for v in versions]
    active = next((str(v["version"]) for v in versions if v.get("active")), None)
    with st.form("model-activate"):
        choice = st.selectbox("Version", names, index=names.index(active) if active else 0)
        force = st.checkbox("Activate even though its gate failed")
        left, right = st.columns(2)
        if left.form_submit_button("Activate"):
            session.call(api, "POST", "/admin/models/activate", {"version": choice, "force": force})
            session.flash(f"{choice} is now the active model.")
            st.rerun()
        if right.form_submit_button("Roll back to the previous version"):
            reply = session.call(api, "POST", "/admin/models/activate", {"rollback": True})
            session.flash(f"Rolled back: {reply['active']} is active.")
            st.rerun()


def render(api: ServiceClient) -> None:
    st.title("Models")
    session.show_flash()
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
    if info.get("switch_error"):
        st.error(md(info["switch_error"]))
    st.caption(
        "Each user is answered by the active version only when they may read every collection "
        "it was trained on; otherwise by the newest version they may use, or the base."
    )
    _versions(api, info.get("versions") or [])
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
