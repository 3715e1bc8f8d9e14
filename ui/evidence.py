"""Answers and their evidence as Markdown: highlighted spans, citation links, quotes and
unverified sentences.

Every character that comes from a document or the model is escaped (:func:`ui.safe.escape`);
the only markup is the UI's own, built here from constants and numbers:

    :yellow-background[...]   a supporting or best-matching span in a passage
    [\\[1\\]](#source-1-…)     a citation marker, a link to source 1's anchor on this page
    > ...                     a quoted passage sentence
    :blue-badge[...]          the label of a quoted answer
    :red-badge[Unverified]    a sentence the documents do not support, :gray[its reason]
    :gray[...]                a draft not yet checked

Spans and claims are those of the answer stream (``appliance.answering``): a source's
``spans`` are ``[start, end]`` character ranges into its ``text``; a claim is ``{text,
supported, source, start, end, reason}``. Messages stored before verification existed lack
them: every function here takes their absence as "nothing to mark".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ui.safe import escape

HIGHLIGHT = "yellow-background"
UNVERIFIED = ":red-badge[Unverified]"
QUOTED = ":blue-badge[:material/format_quote: Quoted from the documents]"

_LINE_BREAK = re.compile(r"\r\n?|\n")
# A citation as the answer text carries it (see appliance.core.prompting.clean_citations):
# [1], [1, 2]
_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")

Href = Callable[[int], str | None]
"""The link target of source ``n``'s anchor, or None where it has none."""


class _Markdown:
    """Builds Markdown from untrusted text (escaped) and the UI's own markup (as is), line by
    line as :func:`ui.safe.md` does: no leading indent (it would make a code block) and a hard
    break for each line break."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._line_start = True

    def text(self, text: str, wrap: str | None = None) -> None:
        """Untrusted ``text``; each of its non-blank lines inside ``:wrap[...]`` if given."""
        for i, line in enumerate(_LINE_BREAK.split(text)):
            if i:
                self._parts.append("  \n")
                self._line_start = True
            if self._line_start:
                line = line.lstrip()
            if not line:
                continue
            if wrap and line.strip():
                core = line.strip()
                lead, trail = line[: len(line) - len(line.lstrip())], line[len(line.rstrip()) :]
                self._parts.append(f"{escape(lead)}:{wrap}[{escape(core)}]{escape(trail)}")
            else:
                self._parts.append(escape(line))
            self._line_start = False

    def markup(self, markup: str) -> None:
        self._parts.append(markup)
        self._line_start = False

    def value(self) -> str:
        return "".join(self._parts)


def spans_of(item: dict[str, Any], length: int) -> list[tuple[int, int]]:
    """``item["spans"]`` clipped to ``[0, length]``, sorted, overlaps merged; bad entries
    (not two integers, empty) are left out: the service's data is checked, not trusted."""
    spans: list[tuple[int, int]] = []
    for span in item.get("spans") or []:
        if not isinstance(span, list | tuple) or len(span) != 2:
            continue
        start, end = span
        if not isinstance(start, int) or not isinstance(end, int):
            continue
        start, end = max(0, start), min(length, end)
        if start < end:
            spans.append((start, end))
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def highlight(text: str, spans: Iterable[tuple[int, int]]) -> str:
    """``text`` as literal Markdown with each span highlighted."""
    out = _Markdown()
    at = 0
    for start, end in spans:
        if start < at:
            continue
        out.text(text[at:start])
        out.text(text[start:end], wrap=HIGHLIGHT)
        at = end
    out.text(text[at:])
    return out.value()


def claims_of(answer: dict[str, Any], key: str = "claims") -> list[dict[str, Any]]:
    """The answer's claims (or ``unsupported_claims``) that are well formed; [] when absent."""
    claims = answer.get(key)
    if not isinstance(claims, list):
        return []
    return [c for c in claims if isinstance(c, dict) and isinstance(c.get("text"), str)]


def claim_source(claim: dict[str, Any]) -> int | None:
    source = claim.get("source")
    return source if isinstance(source, int) and not isinstance(source, bool) else None


def _marker(numbers: Sequence[int], href: Href) -> str:
    linked = []
    for n in numbers:
        target = href(n)
        linked.append(f"[\\[{n}\\]]({target})" if target else f"\\[{n}\\]")
    return "".join(linked)


def _insertions(text: str, claims: Sequence[dict[str, Any]]) -> dict[int, list[int]]:
    """Where a supported claim's source needs a marker: at the end of the claim in ``text``,
    unless a marker for that source already follows or is part of it."""
    at: dict[int, list[int]] = {}
    cursor = 0
    for claim in claims:
        source = claim_source(claim)
        sentence = str(claim["text"]).strip()
        if not claim.get("supported") or source is None or not sentence:
            continue
        found = text.find(sentence, cursor)
        if found < 0:
            found = text.find(sentence)
        if found < 0:
            continue
        end = found + len(sentence)
        cursor = end
        following = _CITATION.match(text[end:].lstrip())
        cited = [m.group(1) for m in _CITATION.finditer(sentence)]
        if following:
            cited.append(following.group(1))
        if any(source in _numbers(c) for c in cited):
            continue
        at.setdefault(end, []).append(source)
    return at


def _numbers(citation: str) -> list[int]:
    return [int(n) for n in re.split(r"\s*,\s*", citation)]


def linked_answer(text: str, claims: Sequence[dict[str, Any]], href: Href) -> str:
    """The answer text exactly as the service gave it, as literal Markdown, with every
    citation marker a link to its source, and a marker added after each supported sentence
    that lacks one for the source that supports it."""
    out = _Markdown()
    insertions = _insertions(text, claims)
    at = 0
    cuts = sorted(
        [(m.start(), m.end(), _numbers(m.group(1))) for m in _CITATION.finditer(text)]
        + [(pos, pos, sources) for pos, sources in insertions.items()]
    )
    for start, end, numbers in cuts:
        if start < at:
            continue
        out.text(text[at:start])
        if start == end and start > 0 and not text[start - 1].isspace():
            out.text(" ")
        out.markup(_marker(numbers, href))
        at = end
    out.text(text[at:])
    return out.value()


def quoted_answer(text: str, claims: Sequence[dict[str, Any]], href: Href) -> str:
    """A quoted answer: each quoted sentence as a block quote with its citation; the answer
    text itself when it came without claims."""
    quotes = [c for c in claims if c.get("supported")] or [{"text": text}]
    lines = []
    for claim in quotes:
        body = linked_answer(str(claim["text"]), [claim], href)
        lines.append("> " + body.replace("  \n", "  \n> "))
    return "\n\n".join(lines)


def provisional(text: str) -> str:
    """Generated text not yet checked against the sources, greyed out."""
    out = _Markdown()
    out.text(text, wrap="gray")
    return out.value()


def unverified_claim(claim: dict[str, Any]) -> str:
    """A sentence left out of the answer, marked, with the reason it was left out."""
    out = _Markdown()
    out.markup(UNVERIFIED + " ")
    out.text(str(claim["text"]).strip())
    reason = claim.get("reason")
    if isinstance(reason, str) and reason.strip():
        out.markup(" ")
        out.text(f"({reason.strip()})", wrap="gray")
    return out.value()
