"""Splitting extracted text into chunks measured in the embedding model's tokens. Pure functions.

Chunks never cross a section (a page or a heading's text), so every chunk has exactly one page
or heading to cite. Inside a section, windows of ``max_tokens`` overlap by ``overlap_tokens``
and end, where possible, at a paragraph, line or sentence boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from appliance.protocols import Chunk, Section

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
                    )
                )
            if j >= n:
                break
            i = _word_start(text, spans, max(j - overlap, i + 1), j)
        offset += len(text) + len(SECTION_SEPARATOR)
    return chunks
