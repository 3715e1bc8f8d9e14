"""Checked answers on the chat page: evidence first, the place in the queue, quoted answers,
highlighted spans, citation links and the "show unverified" toggle.

Answers the real default model cannot give on demand (a quoted answer, a dropped sentence)
come from a recorded answer stream at the UI/API seam (``tests/ui/recorded.py``); the rest
goes through the real core service.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from tests.ui.conftest import ADMIN, STAFF, Core
from tests.ui.recorded import (
    CLIENT,
    INVENTED,
    QUESTION,
    QUOTE,
    RECORDED_CHAT,
    RECORDING,
    evidence_only_events,
    quoted_answer_events,
)
from tests.ui.test_app import (
    ACME,
    LEAVE,
    ask,
    assert_clean,
    is_literal,
    sign_in,
    texts,
    unescape,
    without_own_markup,
)
from ui.evidence import HIGHLIGHT
from ui.safe import escape

MakeApp = Callable[..., AppTest]


def recorded(core: Core, events: list[dict[str, Any]]) -> AppTest:
    """The chat page for a signed-in user whose ``/ask`` replays ``events``."""
    at = AppTest.from_file(str(RECORDED_CHAT), default_timeout=60)
    at.session_state[CLIENT] = core.session(*STAFF)
    at.session_state[RECORDING] = events
    at.run()
    assert_clean(at)
    return at


def highlighted(part: str) -> str:
    """How ``ui.evidence.highlight`` writes a highlighted one-line span."""
    return f":{HIGHLIGHT}[{escape(part)}]"


def passages(at: AppTest) -> str:
    return "\n".join(m.value for e in at.expander for m in e.markdown)


def test_a_quoted_answer_is_labelled_and_links_to_its_highlighted_span(core: Core) -> None:
    at = ask(recorded(core, quoted_answer_events()), QUESTION)
    markdown = [m.value for m in at.markdown]
    assert any("Quoted from the documents" in m for m in markdown), markdown
    quote = next(m for m in markdown if m.startswith("> "))
    assert escape(QUOTE) in quote
    # the citation links to source 1's anchor, a heading inside its (open) panel
    assert "[\\[1\\]](#source-1-of-answer-1)" in quote
    (panel,) = at.expander
    assert "contract.md" in unescape(panel.label)
    assert panel.proto.expanded
    assert panel.markdown[0].value == "###### Source \\[1\\] of answer 1"
    assert highlighted(QUOTE) in panel.markdown[1].value
    # the sentence with the invented figure is not shown as part of the answer
    assert "4.98" not in unescape("\n".join(markdown))
    assert "Waited for the model behind 1 question." in texts(at)


def test_show_unverified_reveals_the_dropped_sentence_always_marked(core: Core) -> None:
    at = ask(recorded(core, quoted_answer_events()), QUESTION)
    toggle = at.toggle(key="unverified-1")
    assert toggle.label == "Show unverified (1)"
    assert not toggle.value
    assert "4.98" not in unescape(texts(at))

    toggle.set_value(True).run()
    assert_clean(at)
    (shown,) = [m.value for m in at.markdown if "4.98" in unescape(m.value)]
    assert shown.startswith(":red-badge[Unverified] ")
    assert escape(INVENTED) in shown
    assert "figure $4.98 billion not in passage [1]" in unescape(shown)

    at.toggle(key="unverified-1").set_value(False).run()
    assert "4.98" not in unescape(texts(at))


def test_the_evidence_shows_before_and_without_the_answer(core: Core) -> None:
    """The sources event alone fills the panel: here the stream ends before the model
    answered, and the passage, its best span highlighted, is still there."""
    at = ask(recorded(core, evidence_only_events()), QUESTION)
    (panel,) = at.expander
    assert highlighted(QUOTE) in passages(at)
    assert not panel.button  # the live panel has no widgets; the answer's panel has them
    assert "stopped before it was complete" in at.error[0].value


def test_hostile_claims_and_spans_stay_text(core: Core) -> None:
    """Markup inside a claim, a reason, a highlighted span or a quote renders literally; the
    only markup is the UI's own (highlight, badge, citation link, quote)."""
    hostile = '<img src=x onerror="alert(1)"> :red[x] [a](javascript:alert(2)) ]]'
    events = quoted_answer_events()
    source = events[0]["sources"][0]
    text = f"{hostile}\n\nThe supply contract {hostile} runs for 36 months."
    for item in (source, events[-1]["answer"]["sources"][0]):
        item["text"] = text
        item["spans"] = [[0, len(text)]]
    answer = events[-1]["answer"]
    answer["claims"][0]["text"] = f"Quote {hostile}"
    answer["unsupported_claims"][0]["text"] = f"Invented {hostile}"
    answer["unsupported_claims"][0]["reason"] = f"reason {hostile}"
    at = ask(recorded(core, events), QUESTION)
    at.toggle(key="unverified-1").set_value(True).run()
    assert_clean(at)
    assert not at.get("html")
    for value in [m.value for m in at.markdown]:
        assert is_literal(without_own_markup(value)), value
    shown = unescape("\n".join(m.value for m in at.markdown))
    for part in (f"Quote {hostile}", f"Invented {hostile}", f"reason {hostile}"):
        assert part in shown


# --- through the real core service -------------------------------------------------------------


def test_a_real_answer_highlights_its_evidence_and_links_its_citations(app: MakeApp) -> None:
    at = ask(sign_in(app(), ADMIN), ACME)
    message = at.session_state["chat.messages"][-1]
    assert message["mode"] in ("generated", "quoted")
    assert message["claims"], message
    shown = unescape(texts(at))
    assert "36 months" in shown
    panels = [e for e in at.expander if "contract.md" in unescape(e.label)]
    assert panels, [e.label for e in at.expander]
    body = "\n".join(m.value for m in panels[0].markdown)
    assert f":{HIGHLIGHT}[" in body  # a supporting or best-matching span
    assert re.search(r"\(#source-\d+-of-answer-1\)", "\n".join(m.value for m in at.markdown))


def test_a_waiting_question_is_told_its_place(
    app: MakeApp, core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model is busy with another question (held mid-answer here); the page's question
    waits behind it and the page says so."""
    at = sign_in(app(), STAFF)
    monkeypatch.setattr(core.service.answerer.queue, "slots", 1)  # whatever the engine batches
    busy = core.service.answerer.stream(LEAVE)
    assert next(e for e in busy if e["type"] == "token")  # holds the model's turn

    def finish_later() -> None:
        # the page's question waits for the model once its retrieval is done
        for _ in range(600):
            if core.service.answerer.queue.ready >= 1:
                break
            threading.Event().wait(0.1)
        list(busy)

    releaser = threading.Thread(target=finish_later)
    releaser.start()
    try:
        ask(at, LEAVE)
    finally:
        releaser.join(120)
    message = at.session_state["chat.messages"][-1]
    assert message["waited"] == 1
    assert "Waited for the model behind 1 question." in texts(at)
    assert "27" in message["answer"]


def test_a_reloaded_conversation_renders_the_same(app: MakeApp, core: Core) -> None:
    first = ask(sign_in(app(), STAFF), LEAVE)
    conversation = first.session_state["chat.conversation"]
    before = [m.value for m in first.markdown]
    at = sign_in(app(), STAFF)
    at.button(key=f"open-{conversation}").click().run()
    assert_clean(at)
    after = [m.value for m in at.markdown]
    stored, live = at.session_state["chat.messages"][-1], first.session_state["chat.messages"][-1]
    for field in ("answer", "claims", "unsupported_claims", "mode", "sources"):
        assert stored[field] == live[field], field
    answer = [m for m in before if "27" in m]
    assert answer
    assert answer[0] in after


def test_a_draft_that_breaks_off_stays_greyed_and_marked_unchecked(core: Core) -> None:
    events = [e for e in quoted_answer_events() if e["type"] != "answer"]
    at = ask(recorded(core, events), QUESTION)
    assert "Draft, never checked against the sources:" in texts(at)
    (draft,) = [m.value for m in at.markdown if "4.98" in unescape(m.value)]
    assert draft.startswith(":gray[")
    assert highlighted(QUOTE) in passages(at)  # the evidence stays
    assert "stopped before it was complete" in at.error[0].value
