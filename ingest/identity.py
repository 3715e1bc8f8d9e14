"""A document's identity line: who issued it, what it is and when, in a few words.

Questions name organisations, titles and periods ("Apple's Q3 2023 10-Q", "the Tallahassee
accident report"), while most chunks of a long document never repeat them. Every chunk is
therefore indexed with its document's identity in front, in both the dense and the sparse text,
and the query side (``ingest.retrieval``) matches questions against it to rank documents.

The identity is taken from the document's content only, so a renamed file keeps its dense
vectors; the file name goes into the sparse text alone (see ``file_name_terms``), which is
recomputed cheaply on a rename. Its parts, in document order, at most ``MAX_IDENTITY_WORDS``:

- the metadata title, when it reads like one;
- a running header or footer, when the pages repeat one that names something (a running line
  such as "Acme Corp. | Q3 2023 Form 10-Q | 7" names issuer, period and kind on every page);
- the best lines near the top of the first section: short lines that name an organisation
  (more so when the document keeps mentioning it: the issuer, not the office it is filed
  with), a date or a period, the kind of document, or a labelled field of a form's header
  ("Sponsor: ...", "Location: ..."); the opening lines, where titles stand, too.

Form boilerplate scores nothing and is skipped: check-box lines, field labels ending in ':',
parenthesised captions, navigation ("Table of Contents", "Page 3 of 9"). A long identity costs
every chunk its share of the embedding model's attention and dilutes BM25 with words that
every chunk of the document repeats, so the budget is small.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import PurePosixPath

from appliance.core.protocols import ParsedDocument, Section

MAX_IDENTITY_WORDS = 32
_SCAN_LINES = 60
_MAX_LINE_WORDS = 16
# A line counts as a running header or footer when it opens or closes this share of the pages.
_RUNNING_SHARE = 0.3
_RUNNING_MIN_PAGES = 3
_EDGE_LINES = 2
# Labelled fields name the document in a form's header; further down they are content.
_FIELD_LINES = 10
# Mentions of an organisation are counted in this much of the text.
_MENTION_CHARS = 1_000_000

_ORG = re.compile(
    r"\b(inc|corp|corporation|company|co|ltd|limited|llc|llp|plc|gmbh|ag|sa|nv|bv|group|holdings|"
    r"university|college|school|board|agency|department|ministry|hospital|clinic|institute|"
    r"council|authority|commission|bank|trust|foundation|association|court|office|service)\b\.?"
    r"(?=\s*(?:$|[|,;(]))",
    re.IGNORECASE,
)
_MONTHS = (
    r"(jan(uary)?|feb(ruary)?|mar(ch)?|apr(il)?|may|june?|july?|aug(ust)?|sep(t(ember)?)?|"
    r"oct(ober)?|nov(ember)?|dec(ember)?)"
)
_DATE = re.compile(
    rf"\b{_MONTHS}\.?\s+\d{{1,2}},?\s+\d{{4}}\b|\b\d{{1,2}}\s+{_MONTHS}\.?,?\s+\d{{4}}\b|"
    r"\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2}/\d{1,2}/\d{2,4}\b|"
    r"\b(q[1-4]|h[12]|quarter|fiscal|fy)\s*'?\d{2,4}\b|"
    rf"\b(year|quarter|period|month)s?\s+end(ed|ing)\b|\b{_MONTHS}\s+\d{{4}}\b",
    re.IGNORECASE,
)
# Words that say what kind of document this is.
_KIND = re.compile(
    r"\b(report|form|protocol|agreement|contract|policy|plan|minutes|manual|procedure|guideline|"
    r"statement|proposal|specification|memorandum|memo|invoice|study|thesis|standard|charter|"
    r"bylaws|prospectus|circular|notice|consent|application|review|audit|assessment|budget)s?\b",
    re.IGNORECASE,
)
_BOILERPLATE = re.compile(
    r"^(table of contents|contents|index|page \d+( of \d+)?|continued|confidential|draft|"
    r"(mark one)|or|and|yes|no|n/?a|none)$",
    re.IGNORECASE,
)
# "Sponsor: Acme Ltd", "Location: Tallahassee, FL": a labelled field with a value.
_FIELD = re.compile(r"^[^\W\d_][\w &/()-]{1,30}:\s*\S")
_CHECKBOX = re.compile("[\u2610\u2611\u2612\u25a1\u25a0]")
_PAGE_NUMBER = re.compile(
    r"(?:\s*[|\u2022\u00b7-]\s*|\s+)(?:page\s+)?\d{1,4}(?:\s+of\s+\d{1,4})?$", re.I
)
_LETTERS = re.compile(r"[^\W\d_]")
# Heading marks and bullets at the start of a line ("# Title", "\u2022 Sponsor").
_MARKUP = re.compile(r"^(?:[#>*\u2022\u25aa\u25e6\u2023\u2043-]+\s+)+")
_CODE_LIKE = re.compile(r"^[\W\d_]*$|^[0-9-]+$")
_NAME_WORD = re.compile(r"[^\W\d_][\w.&'-]*")


def _meaningful_title(title: str | None) -> str | None:
    if not title:
        return None
    title = " ".join(title.split())
    if len(_LETTERS.findall(title)) < 4 or title.lower() in {"untitled", "document", "title"}:
        return None
    return title


def _shape(line: str) -> str:
    return re.sub(r"[\d\W_]+", " ", line.lower()).strip()


def _is_boilerplate(line: str) -> bool:
    """Form furniture that names nothing: labels, captions, check boxes, navigation."""
    n_words = len(line.split())
    return (
        not line
        or n_words > _MAX_LINE_WORDS
        or len(_LETTERS.findall(line)) < 4
        or bool(_CODE_LIKE.match(line))
        or (line.startswith("(") and line.endswith(")"))
        or line.endswith(":")
        or line[0].islower()  # the rest of a sentence or of a wrapped line
        or bool(_CHECKBOX.search(line))
        or bool(_BOILERPLATE.match(line.strip(" .-_|")))
    )


def _running_lines(sections: Sequence[Section]) -> list[str]:
    """Lines that open or close many pages (digits aside), without their page numbers."""
    pages = [s for s in sections if s.page is not None]
    if len(pages) < _RUNNING_MIN_PAGES:
        return []
    counts: Counter[str] = Counter()
    example: dict[str, str] = {}
    for section in pages:
        lines = [" ".join(raw.split()) for raw in section.text.splitlines()]
        lines = [line for line in lines if line]
        shapes = {}
        for line in lines[:_EDGE_LINES] + lines[-_EDGE_LINES:]:
            shapes[re.sub(r"\d+", "#", line.lower())] = line
        for shape, line in shapes.items():
            counts[shape] += 1
            example.setdefault(shape, line)
    needed = max(_RUNNING_MIN_PAGES, math.ceil(_RUNNING_SHARE * len(pages)))
    out = []
    for shape, n in counts.most_common():
        if n < needed:
            break
        line = _PAGE_NUMBER.sub("", example[shape]).strip(" |-")
        if not _is_boilerplate(line) and (_ORG.search(line) or _DATE.search(line)):
            out.append(line)
    return out


def _mentions(name: str, text: str) -> int:
    """How often the name part of an organisation line (its words before the legal suffix)
    recurs in the document."""
    match = _ORG.search(name)
    core = name[: match.start()] if match else name
    words = [w.rstrip(".,") for w in _NAME_WORD.findall(core)]
    if not words:
        return 0
    pattern = r"\b" + r"\W+".join(re.escape(w) for w in words) + r"\b"
    return len(re.findall(pattern, text, re.IGNORECASE))


def _candidates(first: str, text: str) -> list[tuple[float, int, str]]:
    """(score, position, line) for the lines near the top of ``first`` that may name the
    document: those naming an organisation, a date or a kind of document, metadata fields
    ("Sponsor: ...") and the opening lines, where titles stand."""
    lines: list[str] = []
    for raw in first.splitlines()[:_SCAN_LINES]:
        line = _MARKUP.sub("", " ".join(raw.split()))
        if not _is_boilerplate(line):
            lines.append(line)
    mentions = {line: _mentions(line, text) for line in lines if _ORG.search(line)}
    most = max(mentions.values(), default=0)
    out = []
    for position, line in enumerate(lines):
        n_words = len(line.split())
        # Short lines near the top say most per word.
        score = 1.0 - n_words / 24 - position / 20
        signal = False
        if line in mentions:
            # The issuer is mentioned throughout; an office it reports to, rarely.
            share = math.log1p(mentions[line]) / math.log1p(most) if most else 0.0
            score += 1 + 2 * share
            signal = True
        if _DATE.search(line):
            score += 2
            signal = True
        if _KIND.search(line):
            score += 1
            signal = True
        if position < _FIELD_LINES and _FIELD.match(line):
            score += 1
            signal = True
        if position < 2:
            score += 1
            signal = signal or n_words >= 2 + position
        if signal:
            out.append((score, position, line))
    return out


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def identity_line(doc: ParsedDocument) -> str:
    """Up to ``MAX_IDENTITY_WORDS`` words naming the document, from its own content."""
    picked: list[tuple[int, str]] = []
    said: set[str] = set()
    budget = MAX_IDENTITY_WORDS

    def take(position: int, line: str) -> None:
        nonlocal budget
        words = _words(line)
        n_words = len(line.split())
        # A line that repeats what is already said (another shape of the same name) adds nothing.
        if words <= said or n_words > budget:
            return
        picked.append((position, line))
        said.update(words)
        budget -= n_words

    title = _meaningful_title(doc.title)
    if title:
        take(-2, " ".join(title.split()[:MAX_IDENTITY_WORDS]))
    for line in _running_lines(doc.sections)[:1]:
        take(-1, line)
    first = doc.sections[0].text if doc.sections else ""
    text = "\n".join(s.text for s in doc.sections)[:_MENTION_CHARS]
    # Lines of one shape (a list of notes, of share classes) say one thing: keep the first.
    shapes: set[str] = set()
    for _score, pos, line in sorted(_candidates(first, text), key=lambda c: (-c[0], c[1])):
        if _shape(line) not in shapes:
            shapes.add(_shape(line))
            take(pos, line)
    return " | ".join(line for _pos, line in sorted(picked))


def file_name_terms(rel_path: str) -> str:
    """The words of a file's path, for lexical matching ("2023 Q3 AAPL.pdf" -> "2023 Q3 AAPL")."""
    path = PurePosixPath(rel_path)
    parts = [*path.parent.parts, path.stem]
    return " ".join(re.sub(r"[_\-.]+", " ", part) for part in parts).strip()
