"""Splitting extracted text into chunks measured in the embedding model's tokens. Pure functions.

Chunks never cross a section (a page or a heading's text), so every chunk has exactly one page
or heading to cite. Inside a section, windows of ``max_tokens`` overlap by ``overlap_tokens``
and end, where possible, at a paragraph, line or sentence boundary.

A table section (one with a ``header``, see :mod:`ingest.tables`) is cut between rows only,
without overlap, and every chunk of it after the first starts with the header again, so each
chunk says what its columns are. Only a single row longer than a whole chunk is cut inside.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence

from appliance.core.protocols import Chunk, Section

TokenSpans = Callable[[str], list[tuple[int, int]]]

SECTION_SEPARATOR = "\n\n"
_SENTENCE_END = ".!?;:"


def extracted_text(sections: Sequence[Section]) -> str:
    """The document text that chunk offsets refer to."""
    return SECTION_SEPARATOR.join(s.text for s in sections)


def _boundary_rank(text: str, spans: list[tuple[int, int]], j: int) -> int:
    """How good a cut before token ``j`` is: 4 paragraph, 3 line, 2 sentence, 1 word, 0 none."""
    gap = text[spans[j - 1][1] : spans[j][0]]
    if "\n\n" in gap:
        return 4
    if "\n" in gap:
        return 3
    if gap and text[spans[j - 1][1] - 1] in _SENTENCE_END:
        return 2
    return 1 if gap else 0


def _best_cut(text: str, spans: list[tuple[int, int]], lo: int, hi: int) -> int:
    """The cut in ``(lo, hi]`` with the best boundary, preferring the latest among equals."""
    best, best_rank = hi, -1
    for j in range(hi, lo, -1):
        rank = _boundary_rank(text, spans, j)
        if rank > best_rank:
            best, best_rank = j, rank
            if rank == 4:
                break
    return best


def _word_start(text: str, spans: list[tuple[int, int]], j: int, limit: int) -> int:
    """Move ``j`` forward (up to ``limit``) so a window does not begin inside a word."""
    while j < limit and j > 0 and spans[j][0] == spans[j - 1][1]:
        j += 1
    return j


def chunk_sections(
    sections: Sequence[Section],
    token_spans: TokenSpans,
    max_tokens: int,
    overlap_tokens: int,
    *,
    room: Callable[[Section], int] | None = None,
) -> list[Chunk]:
    """Cut ``sections`` into chunks of at most ``max_tokens`` tokens, or fewer where
    ``room(section)`` says less fits (what is embedded with a chunk, such as its heading path,
    shares the model's window with it)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    chunks: list[Chunk] = []
    offset = 0
    for section in sections:
        limit = max_tokens if room is None else max(16, min(max_tokens, room(section)))
        overlap = max(0, min(overlap_tokens, limit // 2))
        text = section.text
        spans = token_spans(text)
        if section.header is not None:
            _chunk_table(section, spans, token_spans, limit, offset, chunks)
            offset += len(text) + len(SECTION_SEPARATOR)
            continue
        n = len(spans)
        i = 0
        while i < n:
            hi = min(i + limit, n)
            j = hi if hi == n else _best_cut(text, spans, i + limit // 2, hi)
            start, end = spans[i][0], spans[j - 1][1]
            piece = text[start:end]
            if piece.strip():
                chunks.append(
                    Chunk(
                        index=len(chunks),
                        text=piece,
                        start=offset + start,
                        end=offset + end,
                        page=section.page,
                        heading=section.heading,
                        ocr_confidence=section.ocr_confidence,
                    )
                )
            if j >= n:
                break
            i = _word_start(text, spans, max(j - overlap, i + 1), j)
        offset += len(text) + len(SECTION_SEPARATOR)
    return chunks


def _chunk_table(
    section: Section,
    spans: list[tuple[int, int]],
    token_spans: TokenSpans,
    limit: int,
    offset: int,
    chunks: list[Chunk],
) -> None:
    """Rows of a table section into chunks of at most ``limit`` tokens: whole rows, each chunk
    after the first led by the header (or by its caption line alone, or nothing, where the
    header would take more than half the room)."""
    text = section.text
    header = section.header or ""
    starts = [s for s, _ in spans]
    # Row character ranges; the header's lines are the first rows' text, never cut apart.
    body_start = len(header) + 1 if header and text.startswith(header + "\n") else 0
    rows: list[tuple[int, int]] = []
    position = body_start
    for line in text[body_start:].split("\n"):
        if line.strip():
            rows.append((position, position + len(line)))
        position += len(line) + 1
    repeat = header
    if header and len(token_spans(repeat)) > limit // 2:
        repeat = header.split("\n", 1)[0]
        if len(token_spans(repeat)) > limit // 2:
            repeat = ""
    repeat_tokens = len(token_spans(repeat)) + 1 if repeat else 0

    def tokens(a: int, b: int) -> int:
        return bisect_left(starts, b) - bisect_left(starts, a)

    def emit(a: int, b: int, lead: bool) -> None:
        piece = text[a:b]
        chunks.append(
            Chunk(
                index=len(chunks),
                text=f"{repeat}\n{piece}" if lead and repeat else piece,
                start=offset + a,
                end=offset + b,
                page=section.page,
                heading=section.heading,
                ocr_confidence=section.ocr_confidence,
                table=True,
            )
        )

    first = True
    i = 0
    while i < len(rows):
        a = 0 if first else rows[i][0]
        room = limit - (0 if first else repeat_tokens)
        j = i
        while j < len(rows) and tokens(a, rows[j][1]) <= room:
            j += 1
        if j == i:
            # One row longer than a chunk: the only place a row is cut, at token boundaries.
            if first and body_start:
                emit(0, body_start - 1, lead=False)
                first = False
                continue
            lo, hi = rows[i]
            inside = [(s, e) for s, e in spans if lo <= s < hi]
            step = max(1, limit - repeat_tokens)
            for k in range(0, len(inside), step):
                part = inside[k : k + step]
                emit(part[0][0], part[-1][1], lead=True)
            i += 1
            first = False
            continue
        emit(a, rows[j - 1][1], lead=not first)
        first = False
        i = j
