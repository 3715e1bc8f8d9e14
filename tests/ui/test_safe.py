"""Untrusted text renders literally: ``ui.safe.md`` against a CommonMark renderer."""

from __future__ import annotations

import html

import pytest

from appliance.core.errors import ServiceError
from ui.formatting import collection_label, error_text, source_title, when
from ui.safe import label, md

markdown_it = pytest.importorskip("markdown_it", reason="markdown-it-py renders the check")

HOSTILE = [
    "<script>alert(1)</script>",
    '<img src=x onerror="alert(1)">',
    "[click](javascript:alert(1))",
    "![x](http://evil.example/x.png)",
    "**bold** _em_ `code` ~~gone~~ # heading",
    ":red[coloured] $x^2$ <https://example.org> &lt;b&gt;",
    "    indented like code\n> quoted\n- item\n1. item",
    "a | b\n--|--\nc | d",
    "back\\slash\\<script>",
]


def rendered(markdown: str) -> str:
    """CommonMark with raw HTML passed through (the worst case), tables and strikethrough."""
    parser = markdown_it.MarkdownIt("commonmark", {"html": True})
    return str(parser.enable(["table", "strikethrough"]).render(markdown))


@pytest.mark.parametrize("text", HOSTILE)
def test_md_renders_every_character_literally(text: str) -> None:
    out = rendered(md(text))
    for markup in ("<script", "<img", "<a ", "<strong>", "<em>", "<code>", "<h1>", "<table>"):
        assert markup not in out
    assert "<pre>" not in out
    # what the reader sees is the text, character for character (line breaks aside)
    visible = html.unescape(out.replace("<br />", "").replace("<p>", "").replace("</p>", ""))
    assert " ".join(visible.split()) == " ".join(text.split())


def test_md_keeps_line_breaks_and_paragraphs() -> None:
    out = rendered(md("first line\nsecond line\n\nnext paragraph"))
    assert out.count("<br />") == 1
    assert out.count("<p>") == 2


def test_label_is_one_line_and_bounded() -> None:
    text = "<b>name</b>\nwith a break " + "x" * 300
    out = label(text, limit=40)
    assert "\n" not in out
    assert "<b>" not in rendered(out)
    assert out.endswith("…")


def test_source_title_names_the_file_and_page_or_heading() -> None:
    assert source_title({"number": 1, "path": "legal/a.pdf", "page": 3}) == "[1] a.pdf, page 3"
    assert (
        source_title({"number": 2, "path": "hr/leave.md", "page": None, "heading": "Leave"})
        == "[2] leave.md, Leave"
    )
    assert source_title({"number": 3, "path": "notes.txt"}) == "[3] notes.txt"


def test_error_text_drops_the_transport_prefix() -> None:
    refused = ServiceError(
        "the core service refused POST /admin/users/create: the password is too short", 400
    )
    assert error_text(refused) == "The password is too short"
    silent = ServiceError("the core service at 127.0.0.1:1 did not answer: refused")
    assert error_text(silent) == "The core service at 127.0.0.1:1 did not answer: refused"


def test_small_formatters() -> None:
    assert when(None) == ""
    assert len(when(0.0)) == len("1970-01-01 00:00")
    assert collection_label("") != ""
    assert collection_label("legal") == "legal"
