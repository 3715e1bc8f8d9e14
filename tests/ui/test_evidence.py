"""The Markdown of answers and evidence (``ui.evidence``): the UI's own markup around text that
stays literal, whatever the documents or the model put in it."""

from __future__ import annotations

import pytest

from tests.ui.test_safe import HOSTILE, rendered
from ui.evidence import (
    HIGHLIGHT,
    claims_of,
    highlight,
    linked_answer,
    quoted_answer,
    spans_of,
    unverified_claim,
)


def href(n: int) -> str | None:
    return f"#source-{n}-of-answer-1" if n in (1, 2) else None


def claim(text: str, source: int | None, supported: bool = True) -> dict[str, object]:
    return {"text": text, "supported": supported, "source": source, "reason": "r"}


def test_spans_are_clipped_sorted_merged_and_bad_ones_ignored() -> None:
    source = {"spans": [[8, 12], [0, 3], [2, 5], [10, 99], [7, 7], "x", [1.5, 2], [-4, 1]]}
    assert spans_of(source, 20) == [(0, 5), (8, 20)]
    assert spans_of({}, 20) == []
    assert spans_of({"spans": None}, 20) == []


def test_highlight_wraps_each_line_of_a_span_and_escapes_everything() -> None:
    text = "Total net sales\n  81,797 (in $ millions)\nOther"
    out = highlight(text, [(6, 34)])
    assert out == (
        "Total :yellow-background[net sales]  \n"
        ":yellow-background[81\\,797 \\(in \\$ mil]lions\\)  \n"
        "Other"
    )
    assert HIGHLIGHT == "yellow-background"


@pytest.mark.parametrize("text", HOSTILE)
def test_highlighted_hostile_text_renders_no_markup(text: str) -> None:
    out = rendered(highlight(text, [(0, len(text) // 2)]))
    for markup in ("<script", "<img", "<a ", "<strong>", "<em>", "<code>", "<h1>", "<table>"):
        assert markup not in out
    assert "<pre>" not in out


def test_citations_become_links_and_supported_sentences_get_theirs() -> None:
    text = "Sales were $81.8 billion [1]. Mac sales fell. Unknown [7]."
    claims = [
        claim("Sales were $81.8 billion [1].", 1),
        claim("Mac sales fell.", 2),
        claim("Unknown [7].", None, supported=False),
    ]
    out = linked_answer(text, claims, href)
    assert out == (
        "Sales were \\$81\\.8 billion [\\[1\\]](#source-1-of-answer-1)\\. "
        "Mac sales fell\\. [\\[2\\]](#source-2-of-answer-1) Unknown \\[7\\]\\."
    )
    html = rendered(out)
    assert '<a href="#source-1-of-answer-1">[1]</a>' in html
    assert '<a href="#source-2-of-answer-1">[2]</a>' in html
    assert "Unknown [7]." in html


def test_an_answer_without_claims_is_its_text_with_linked_citations() -> None:
    assert rendered(linked_answer("It is 27 days [1, 2].", [], href)).strip() == (
        '<p>It is 27 days <a href="#source-1-of-answer-1">[1]</a>'
        '<a href="#source-2-of-answer-1">[2]</a>.</p>'
    )


def test_quotes_are_block_quotes_with_their_citation() -> None:
    claims = [claim("Line one\nline two", 1), claim("Not shown", None, supported=False)]
    html = rendered(quoted_answer("ignored", claims, href))
    assert html.count("<blockquote>") == 1
    assert "Line one<br />\nline two" in html
    assert '<a href="#source-1-of-answer-1">[1]</a>' in html
    assert "Not shown" not in html
    # no claims (an older message): the text itself is the quote
    assert "<blockquote>" in rendered(quoted_answer("Quoted text", [], href))


def test_an_unverified_claim_is_marked_with_its_reason() -> None:
    out = unverified_claim(claim("It grew 5.7% <b>", None, supported=False) | {"reason": "no 5.7%"})
    assert out == ":red-badge[Unverified] It grew 5\\.7\\% \\<b\\> :gray[\\(no 5\\.7\\%\\)]"


def test_malformed_claims_are_left_out() -> None:
    answer = {"claims": [claim("ok", 1), "text", {"supported": True}, {"text": 3}]}
    assert claims_of(answer) == [claim("ok", 1)]
    assert claims_of({"claims": "x"}) == []
    assert claims_of({}, "unsupported_claims") == []
