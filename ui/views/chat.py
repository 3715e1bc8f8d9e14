"""Chat: questions in, streamed answers out, each with its sources, a download and feedback.

Conversations are kept by the service per user; the sidebar lists them to resume, rename or
delete. Everything from documents or the model is shown through :func:`ui.safe.md`.
"""

from __future__ import annotations

import mimetypes
from typing import Any

import streamlit as st

from appliance.api import ServiceClient
from appliance.errors import ServiceError
from ui import session
from ui.formatting import file_name, source_title
from ui.safe import label, md

# Session state (no bare strings at module level: Streamlit's "magic" would show them):
CONVERSATION = "chat.conversation"  # the open conversation's id, None for a new one
MESSAGES = "chat.messages"  # its exchanges; None while they still have to be loaded
FILES = "chat.files"  # downloaded source files by path: (name, content type, bytes)
RATED = "chat.rated"  # the (rating, comment) last sent per message id
CONFIRM_DELETE = "chat.confirm_delete"  # the conversation whose deletion awaits a "yes"

PLACEHOLDER = "Ask a question about your documents"
CURSOR = " ▌"


def render(api: ServiceClient) -> None:
    state = st.session_state
    state.setdefault(CONVERSATION, None)
    state.setdefault(MESSAGES, [])
    state.setdefault(FILES, {})
    state.setdefault(RATED, {})
    st.title("Chat")
    if state[MESSAGES] is None:
        state[MESSAGES] = _load(api, state[CONVERSATION])
    if not state[MESSAGES]:
        st.caption("Answers come from the documents you may read, with their sources.")
    for message in state[MESSAGES]:
        _exchange(api, message)
    question = st.chat_input(PLACEHOLDER)
    if question and question.strip():
        _ask(api, question.strip())
    _sidebar(api)


def _load(api: ServiceClient, conversation: str | None) -> list[dict[str, Any]]:
    if not conversation:
        return []
    try:
        messages = api.call("POST", "/conversations/get", {"conversation": conversation})
    except ServiceError as exc:  # e.g. deleted in another tab: start afresh
        session.show_error(exc)
        st.session_state[CONVERSATION] = None
        return []
    return [
        {
            "id": m.get("id"),
            "question": m.get("question", ""),
            "answer": m.get("answer", ""),
            "sources": m.get("sources") or [],
            "abstained": bool(m.get("abstained")),
        }
        for m in messages
    ]


def _exchange(api: ServiceClient, message: dict[str, Any]) -> None:
    with st.chat_message("user"):
        st.markdown(md(message["question"]))
    with st.chat_message("assistant"):
        st.markdown(md(message["answer"]))
        _after_answer(api, message)


def _ask(api: ServiceClient, question: str) -> None:
    state = st.session_state
    with st.chat_message("user"):
        st.markdown(md(question))
    with st.chat_message("assistant"):
        box = st.empty()
        box.caption("Searching your documents…")
        text, final = "", None
        body = {"question": question, "stream": True, "conversation": state[CONVERSATION]}
        try:
            for event in api.stream("/ask", body):
                if event.get("type") == "token":
                    text += str(event.get("text", ""))
                    box.markdown(md(text) + CURSOR)
                elif event.get("type") == "answer":
                    final = event
        except ServiceError as exc:
            box.markdown(md(text))
            session.show_error(exc)
            return
        if final is None:
            box.markdown(md(text))
            st.error("The answer stopped before it was complete. Please ask again.")
            return
        answer = final["answer"]
        box.markdown(md(answer.get("answer", text)))
        message = {
            "id": final.get("message"),
            "question": question,
            "answer": answer.get("answer", text),
            "sources": answer.get("sources") or [],
            "abstained": bool(answer.get("abstained")),
        }
        if final.get("conversation"):
            state[CONVERSATION] = final["conversation"]
        state[MESSAGES].append(message)
        _after_answer(api, message)


def _after_answer(api: ServiceClient, message: dict[str, Any]) -> None:
    """Under an answer: its sources, then thumbs up or down."""
    sources = message["sources"]
    if sources:
        st.caption("Sources")
    for source in sources:
        _source(api, message.get("id"), source)
    if message.get("id") is not None:
        _feedback(api, int(message["id"]))


def _source(api: ServiceClient, message_id: int | None, source: dict[str, Any]) -> None:
    path = str(source.get("path", ""))
    key = f"{message_id}-{source.get('number')}"
    if source.get("unavailable"):  # access revoked or the document deleted since
        st.caption(md(f"[{source.get('number', '?')}] {source.get('text', '')}"))
        return
    with st.expander(label(source_title(source))):
        st.markdown(md(source.get("text", "")))
        caption = path if source.get("page") is None else f"{path}, page {source['page']}"
        st.caption(md(caption))
        files: dict[str, tuple[str, str, bytes]] = st.session_state[FILES]
        if path not in files:
            if not st.button("Get the file", key=f"get-{key}", icon=":material/description:"):
                return
            try:
                files[path] = api.download("/documents/file", {"path": path})
            except ServiceError as exc:
                session.show_error(exc)
                return
        name, content_type, data = files[path]
        st.download_button(
            label(f"Download {name or file_name(path)}"),
            data=data,
            file_name=name or file_name(path),
            mime=content_type or mimetypes.guess_type(path)[0] or "application/octet-stream",
            key=f"download-{key}",
            on_click="ignore",
            icon=":material/download:",
        )


def _feedback(api: ServiceClient, message_id: int) -> None:
    """Thumbs up or down, sent at once; then an optional comment (a new rating keeps it)."""
    rated: dict[int, tuple[str, str]] = st.session_state[RATED]
    choice = st.feedback("thumbs", key=f"rating-{message_id}")
    if choice is None:
        return
    rating = "up" if choice == 1 else "down"
    sent_rating, sent_comment = rated.get(message_id, ("", ""))
    if sent_rating != rating:
        if not _send_feedback(api, message_id, rating, sent_comment):
            return
        rated[message_id] = (rating, sent_comment)
    with st.form(f"comment-{message_id}", border=False, clear_on_submit=True):
        comment = st.text_input(
            "Comment (optional)",
            key=f"comment-text-{message_id}",
            placeholder="What was good or wrong?",
            max_chars=2000,
        )
        sent = st.form_submit_button("Send comment")
    if sent and comment.strip():
        if _send_feedback(api, message_id, rating, comment.strip()):
            rated[message_id] = (rating, comment.strip())
            st.caption("Thank you for the comment.")
        return
    st.caption("Thank you for the feedback.")


def _send_feedback(api: ServiceClient, message_id: int, rating: str, comment: str) -> bool:
    try:
        api.call("POST", "/feedback", {"message": message_id, "rating": rating, "comment": comment})
    except ServiceError as exc:
        session.show_error(exc)
        return False
    return True


# --- the sidebar: conversations --------------------------------------------------------------


def _open(conversation: str | None) -> None:
    state = st.session_state
    state[CONVERSATION] = conversation
    state[MESSAGES] = None if conversation else []
    state[FILES] = {}
    state[CONFIRM_DELETE] = None


def _sidebar(api: ServiceClient) -> None:
    state = st.session_state
    with st.sidebar:
        st.button(
            "New conversation",
            on_click=_open,
            args=(None,),
            icon=":material/add:",
            width="stretch",
        )
        try:
            conversations = api.call("GET", "/conversations")
        except ServiceError as exc:
            session.show_error(exc)
            return
        if not conversations:
            return
        st.caption("Conversations")
        current = None
        for conversation in conversations[:100]:
            is_open = conversation["id"] == state[CONVERSATION]
            if is_open:
                current = conversation
            st.button(
                label(conversation["title"], limit=60),
                key=f"open-{conversation['id']}",
                on_click=_open,
                args=(conversation["id"],),
                type="secondary" if is_open else "tertiary",
                width="stretch",
            )
        if current is not None:
            _manage(api, current)


def _manage(api: ServiceClient, conversation: dict[str, Any]) -> None:
    state = st.session_state
    with st.expander("This conversation"):
        with st.form("rename", border=False):
            title = st.text_input("Title", value=conversation["title"], max_chars=120)
            rename = st.form_submit_button("Rename")
        if rename and title.strip():
            body = {"conversation": conversation["id"], "title": title.strip()}
            try:
                api.call("POST", "/conversations/rename", body)
            except ServiceError as exc:
                session.show_error(exc)
                return
            st.rerun()
        if state.get(CONFIRM_DELETE) != conversation["id"]:
            if st.button("Delete", icon=":material/delete:"):
                state[CONFIRM_DELETE] = conversation["id"]
                st.rerun()
            return
        st.warning("Delete this conversation for good?")
        yes, no = st.columns(2)
        if no.button("Keep it"):
            state[CONFIRM_DELETE] = None
            st.rerun()
        if yes.button("Delete it", type="primary"):
            try:
                api.call("POST", "/conversations/delete", {"conversation": conversation["id"]})
            except ServiceError as exc:
                session.show_error(exc)
                return
            _open(None)
            st.rerun()


if __name__ == "__main__":
    render(session.api())
