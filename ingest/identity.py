"""A document's identity line: who issued it, what it is and when, in a few words.

Questions name organisations, titles and periods ("Apple's Q3 2023 10-Q", "the Tallahassee
accident report"), while most chunks of a long document never repeat them. Every chunk is
therefore indexed with its document's identity in front, in both the dense and the sparse text.

The identity is taken from the document's content only (metadata title and the salient lines of
its first section), so a renamed file keeps its dense vectors; the file name goes into the sparse
text alone (see ``file_name_terms``), which is recomputed cheaply on a rename.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from appliance.protocols import ParsedDocument

MAX_IDENTITY_WORDS = 40
_SCAN_LINES = 60
_MAX_LINE_WORDS = 16

_ORG = re.compile(
    r"\b(inc|corp|corporation|company|co|ltd|limited|llc|llp|plc|gmbh|ag|sa|nv|bv|group|holdings|"
    r"university|college|school|board|agency|department|ministry|hospital|clinic|institute|"
    r"council|authority|commission|bank|trust|foundation|association|court|office|service)\b\.?\s*$",
    re.IGNORECASE,
)
_MONTHS = (
    r"(jan(uary)?|feb(ruary)?|mar(ch)?|apr(il)?|may|june?|july?|aug(ust)?|sep(t(ember)?)?|"
    r"oct(ober)?|nov(ember)?|dec(ember)?)"
)
_DATE = re.compile(
    rf"\b{_MONTHS}\.?\s+\d{{1,2}},?\s+\d{{4}}\b|\b\d{{1,2}}\s+{_MONTHS}\.?\s+\d{{4}}\b|"
    r"\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2}/\d{1,2}/\d{2,4}\b|\b(q[1-4]|quarter|fiscal|fy)\s*\d{2,4}\b",
    re.IGNORECASE,
)
_LETTERS = re.compile(r"[^\W\d_]")
_CODE_LIKE = re.compile(r"^[\W\d_]*$|^[0-9-]+$")


def _meaningful_title(title: str | None) -> str | None:
    if not title:
        return None
    title = " ".join(title.split())
    if len(_LETTERS.findall(title)) < 4 or title.lower() in {"untitled", "document", "title"}:
        return None
    return title


def _shape(line: str) -> str:
    return re.sub(r"[\d\W_]+", " ", line.lower()).strip()


def _line_score(line: str, position: int) -> float:
    # Short lines near the top that name an organisation or a date say most per word.
    score = 1.0 - len(line.split()) / 12
    if _ORG.search(line):
        score += 3
    if _DATE.search(line):
        score += 2
    if position < 3:
        score += 1.5
    return score - position / 20


def identity_line(doc: ParsedDocument) -> str:
    """Up to ``MAX_IDENTITY_WORDS`` words naming the document, from its own content."""
    picked: list[tuple[int, str]] = []
    title = _meaningful_title(doc.title)
    words = 0
    if title:
        title_words = title.split()[:MAX_IDENTITY_WORDS]
        picked.append((-1, " ".join(title_words)))
        words = len(title_words)
    first = doc.sections[0].text if doc.sections else ""
    candidates: list[tuple[float, int, str]] = []
    position = 0
    for raw in first.splitlines()[:_SCAN_LINES]:
        line = " ".join(raw.split())
        n_words = len(line.split())
        if (
            not line
            or n_words > _MAX_LINE_WORDS
            or len(_LETTERS.findall(line)) < 4
            or _CODE_LIKE.match(line)
            or (line.startswith("(") and line.endswith(")"))
            or re.match(r"^page \d+( of \d+)?$", line, re.IGNORECASE)
        ):
            continue
        candidates.append((_line_score(line, position), position, line))
        position += 1
    # Lines of one shape (a list of notes, of share classes) say one thing: keep the first.
    seen = {_shape(p[1]) for p in picked}
    for _score, pos, line in sorted(candidates, key=lambda c: (-c[0], c[1])):
        n_words = len(line.split())
        if _shape(line) in seen or words + n_words > MAX_IDENTITY_WORDS:
            continue
        picked.append((pos, line))
        seen.add(_shape(line))
        words += n_words
    return " | ".join(line for _pos, line in sorted(picked))


def file_name_terms(rel_path: str) -> str:
    """The words of a file's path, for lexical matching ("2023 Q3 AAPL.pdf" -> "2023 Q3 AAPL")."""
    path = PurePosixPath(rel_path)
    parts = [*path.parent.parts, path.stem]
    return " ".join(re.sub(r"[_\-.]+", " ", part) for part in parts).strip()
