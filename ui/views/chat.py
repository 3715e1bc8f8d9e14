"""Chat: questions in, checked answers out, each with its sources, a download and feedback.

While a question is answered the page shows, in this order, what the answer stream brings:

    sources event  ─► the passages found, best-matching spans highlighted (before the model)
    queue events   ─► "Waiting for the model: N questions ahead of yours."
    a 503 (busy)   ─► "The assistant is busy ...: try again in N s." (the queue is full)
    token events   ─► the draft, greyed out: not yet checked against the sources
    answer event   ─► the answer as the service checked it: each citation a link to its
                      source's anchor below, the supporting spans highlighted there; a quoted
                      answer labelled as such; dropped sentences behind "Show unverified"

Conversations are kept by the service per user; the sidebar lists them to resume, rename or
delete. Everything from documents or the model is escaped (:mod:`ui.safe`, :mod:`ui.evidence`).
"""

from __future__ import annotations

import math
import mimetypes
from typing import Any

import streamlit as st

from appliance.api import ServiceClient
from appliance.core.errors import ServiceError
from ui import evidence, session
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
    for position, message in enumerate(state[MESSAGES], 1):
        _exchange(api, message, position, latest=position == len(state[MESSAGES]))
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
    return [_message(m, m.get("id"), str(m.get("question", ""))) for m in messages]


def _message(answer: dict[str, Any], message_id: Any, question: str) -> dict[str, Any]:
    """What the page keeps of an exchange. Messages from before answers were verified lack
    claims and mode: they show as plain answers."""
    return {
        "id": message_id,
        "question": question,
        "answer": str(answer.get("answer", "")),
        "sources": [s for s in answer.get("sources") or [] if isinstance(s, dict)],
        "abstained": bool(answer.get("abstained")),
        "claims": evidence.claims_of(answer),
        "unsupported_claims": evidence.claims_of(answer, "unsupported_claims"),
        "mode": answer.get("mode") if answer.get("mode") in ("generated", "quoted") else None,
        "waited": int(answer.get("waited") or 0),
        "served_by": _served_by(answer),
    }


def _served_by(answer: dict[str, Any]) -> str:
    """Which model wrote the answer: its registry version (which depends on the collections
    the user may read) and file, or the model's name (older messages, model servers)."""
    served = answer.get("served_by")
    if isinstance(served, dict) and served.get("version"):
        name = str(served.get("name") or "").split("@", 1)[0]
        return f"{served['version']}" + (f" ({name})" if name else "")
    return str((served or {}).get("name") if isinstance(served, dict) else "") or str(
        answer.get("model") or ""
    )


def _exchange(
    api: ServiceClient, message: dict[str, Any], position: int, *, latest: bool = False
) -> None:
    """One question and its answer; ``position`` counts from 1 in the conversation."""
    with st.chat_message("user"):
        st.markdown(md(message["question"]))
    with st.chat_message("assistant"):
        _answer(message, position)
        _after_answer(api, message, position, latest=latest)


def _ask(api: ServiceClient, question: str) -> None:
    """Ask, and show the answer as it comes: the evidence first (the sources event arrives
    before the model starts), the place in the queue while the model is busy, the draft as
    it is generated (greyed out: not yet checked), then the verified answer."""
    state = st.session_state
    with st.chat_message("user"):
        st.markdown(md(question))
    with st.chat_message("assistant"):
        status = st.empty()
        status.caption(SEARCHING)
        box = st.empty()
        live = st.empty()  # the evidence until the answer is in; then the answer's own panel
        text, final, found, waited, checked = "", None, 0, 0, 0
        body = {"question": question, "stream": True, "conversation": state[CONVERSATION]}
        try:
            for event in api.stream("/ask", body):
                kind = event.get("type")
                if kind == "sources":
                    sources = [s for s in event.get("sources") or [] if isinstance(s, dict)]
                    found = len(sources)
                    status.caption(_found(found))
                    with live.container():
                        _evidence(sources)
                elif kind == "queue":
                    position = int(event.get("position") or 0)
                    waited = max(waited, position)
                    status.caption(_found(found) + " " + _queue(position))
                elif kind == "token":
                    text += str(event.get("text", ""))
                    status.caption(_draft(checked))
                    box.markdown(evidence.provisional(text) + CURSOR)
                elif kind == "claim":
                    checked += 1
                    status.caption(_draft(checked))
                elif kind == "answer":
                    final = event
        except ServiceError as exc:
            _unfinished(status, box, text)
            if exc.status == 503:  # the queue is full: say when to come back, not an error
                st.warning(busy(exc.retry_after_s), icon=":material/hourglass_top:")
            else:
                session.show_error(exc)
            return
        if final is None:
            _unfinished(status, box, text)
            st.error("The answer stopped before it was complete. Please ask again.")
            return
        status.empty()
        live.empty()
        message = _message(final["answer"] | {"waited": waited}, final.get("message"), question)
        if final.get("conversation"):
            state[CONVERSATION] = final["conversation"]
        state[MESSAGES].append(message)
        position = len(state[MESSAGES])
        with box.container():
            _answer(message, position)
        _after_answer(api, message, position, latest=True)


def _unfinished(status: Any, box: Any, text: str) -> None:
    """An answer that broke off: its draft stays greyed out and says it was never checked;
    the evidence found stays too."""
    if text:
        status.caption("Draft, never checked against the sources:")
        box.markdown(evidence.provisional(text))
    else:
        status.empty()


SEARCHING = "Searching your documents…"


def _found(count: int) -> str:
    if not count:
        return SEARCHING
    return f"Found {count} passage{'s' if count != 1 else ''}, shown below."


def _queue(position: int) -> str:
    if position <= 0:
        return "The model is starting on your question…"
    ahead = "1 question" if position == 1 else f"{position} questions"
    return f"Waiting for the model: {ahead} ahead of yours."


def busy(retry_after_s: float | None) -> str:
    """The message for a question the service refused because too many were waiting."""
    wait = max(1, math.ceil(retry_after_s)) if retry_after_s else None
    when = f"try again in {wait} s" if wait else "try again in a moment"
    return f"The assistant is busy answering other questions: {when}. Your question was not sent."


def _draft(checked: int) -> str:
    done = f" ({checked} sentence{'s' if checked != 1 else ''} checked)" if checked else ""
    return f"Draft, not yet checked against the sources{done}…"


def _anchor(number: int, position: int) -> tuple[str, str]:
    """The heading that marks source ``number`` of answer ``position`` on the page, and its
    id: Streamlit gives a Markdown heading the slug of its text as id, which for this ASCII
    text is the text lowercased, punctuation dropped, spaces turned into hyphens."""
    return (
        f"###### Source \\[{number}\\] of answer {position}",
        f"source-{number}-of-answer-{position}",
    )


def _answer(message: dict[str, Any], position: int) -> None:
    """The answer as shown: citations link to the sources below; a quoted answer says so."""
    numbers = {s.get("number") for s in message["sources"]}

    def href(n: int) -> str | None:
        return f"#{_anchor(n, position)[1]}" if n in numbers else None

    if message.get("mode") == "quoted":
        st.markdown(evidence.QUOTED)
        st.markdown(evidence.quoted_answer(message["answer"], message.get("claims") or [], href))
        # with answer.unsupported: flag, the generated sentences follow the quotes, marked
        for claim in message.get("unsupported_claims") or []:
            if str(claim["text"]).strip() in message["answer"]:
                st.markdown(evidence.unverified_claim(claim))
    else:
        st.markdown(evidence.linked_answer(message["answer"], message.get("claims") or [], href))
    if message.get("waited"):
        ahead = "1 question" if message["waited"] == 1 else f"{message['waited']} questions"
        st.caption(f"Waited for the model behind {ahead}.")
    if message.get("served_by") and not message.get("abstained"):
        st.caption(md(f"Answered by model {message['served_by']}."))


def _evidence(sources: list[dict[str, Any]]) -> None:
    """The sources as soon as they are found, the best-matching spans highlighted (no widgets:
    the answer's own panel replaces this one in the same run)."""
    if sources:
        st.caption("Sources")
    for i, source in enumerate(sources):
        with st.expander(label(source_title(source)), expanded=i == 0):
            st.markdown(_passage(source))


def _passage(source: dict[str, Any]) -> str:
    text = str(source.get("text", ""))
    return evidence.highlight(text, evidence.spans_of(source, len(text)))


def _after_answer(
    api: ServiceClient, message: dict[str, Any], position: int, *, latest: bool = False
) -> None:
    """Under an answer: the unverified sentences on request, its sources (those supporting
    the latest answer open), then thumbs up or down."""
    shown = message["answer"]
    dropped = [
        c for c in message.get("unsupported_claims") or [] if str(c["text"]).strip() not in shown
    ]
    if dropped and st.toggle(
        f"Show unverified ({len(dropped)})",
        key=f"unverified-{message.get('id') or position}",
        help="Sentences the model wrote that the documents do not support: left out.",
    ):
        for claim in dropped:
            st.markdown(evidence.unverified_claim(claim))
    sources = message["sources"]
    if sources:
        st.caption("Sources")
    supporting = {
        evidence.claim_source(c) for c in message.get("claims") or [] if c.get("supported")
    }
    for source in sources:
        number = source.get("number")
        _source(api, message, source, position, expanded=latest and number in supporting)
    if message.get("id") is not None:
        _feedback(api, int(message["id"]))


def _source(
    api: ServiceClient,
    message: dict[str, Any],
    source: dict[str, Any],
    position: int,
    *,
    expanded: bool,
) -> None:
    path = str(source.get("path", ""))
    key = f"{message.get('id')}-{source.get('number')}"
    if source.get("unavailable"):  # access revoked or the document deleted since
        st.caption(md(f"[{source.get('number', '?')}] {source.get('text', '')}"))
        return
    with st.expander(label(source_title(source)), expanded=expanded):
        # The citation links' target; the browser opens a closed expander to show it.
        if isinstance(source.get("number"), int):
            st.markdown(_anchor(source["number"], position)[0])
        st.markdown(_passage(source))
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
