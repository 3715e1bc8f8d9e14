import itertools
import re

import pytest

from appliance.core.protocols import Section
from ingest.chunking import chunk_sections, extracted_text


def word_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"\w+|[^\w\s]", text)]


def test_offsets_point_into_the_extracted_text() -> None:
    sections = [
        Section("First page. " * 50, page=1),
        Section("Second page text.\n\nAnother paragraph here. " * 30, page=2),
    ]
    chunks = chunk_sections(sections, word_spans, max_tokens=40, overlap_tokens=8)
    text = extracted_text(sections)
    assert chunks
    for chunk in chunks:
        assert text[chunk.start : chunk.end] == chunk.text
        assert len(word_spans(chunk.text)) <= 40
    assert [c.index for c in chunks] == list(range(len(chunks)))


def test_chunks_never_cross_a_page_or_heading() -> None:
    sections = [
        Section("alpha " * 30, heading="A"),
        Section("beta " * 30, heading="A > B"),
        Section("gamma " * 5, page=3),
    ]
    chunks = chunk_sections(sections, word_spans, max_tokens=16, overlap_tokens=4)
    for chunk in chunks:
        words = set(chunk.text.split())
        assert len(words) == 1
        expected = {"alpha": ("A", None), "beta": ("A > B", None), "gamma": (None, 3)}
        assert (chunk.heading, chunk.page) == expected[words.pop()]


def test_overlap_and_full_coverage() -> None:
    text = " ".join(f"w{i}" for i in range(200))
    chunks = chunk_sections([Section(text)], word_spans, max_tokens=50, overlap_tokens=10)
    covered = set()
    for chunk in chunks:
        covered.update(chunk.text.split())
    assert covered == set(text.split())
    for a, b in itertools.pairwise(chunks):
        assert b.start < a.end  # consecutive chunks overlap


def test_cuts_prefer_paragraph_boundaries() -> None:
    para = "word " * 30
    text = f"{para.strip()}.\n\n{para.strip()}.\n\n{para.strip()}."
    chunks = chunk_sections([Section(text)], word_spans, max_tokens=45, overlap_tokens=0)
    assert chunks[0].text.endswith(".")
    assert chunks[1].text.startswith("word")


def test_blank_sections_give_no_chunks() -> None:
    assert chunk_sections([Section("   \n ")], word_spans, 10, 2) == []
    with pytest.raises(ValueError, match="max_tokens"):
        chunk_sections([Section("x")], word_spans, 0, 0)


def test_real_tokenizer_limits(real_embedder) -> None:  # type: ignore[no-untyped-def]
    text = "The appliance's retention policy (AP-12) keeps audit logs for 7 years. " * 40
    chunks = chunk_sections([Section(text, page=1)], real_embedder.token_spans, 64, 16)
    assert len(chunks) > 1
    for chunk in chunks:
        assert len(real_embedder.token_spans(chunk.text)) <= 64


def test_room_per_section_shrinks_chunks_under_long_headings() -> None:
    sections = [Section("word " * 100, heading="Short"), Section("word " * 100, heading="A " * 30)]

    def room(section: Section) -> int:
        return 60 - len(word_spans(section.heading or ""))

    chunks = chunk_sections(sections, word_spans, 50, 5, room=room)
    by_heading: dict[str | None, int] = {}
    for chunk in chunks:
        size = len(word_spans(chunk.text))
        by_heading[chunk.heading] = max(by_heading.get(chunk.heading, 0), size)
        assert size + len(word_spans(chunk.heading or "")) <= 60 or size <= 16
    assert by_heading["Short"] == 50
    assert by_heading["A " * 30] == 30


def test_pipeline_keeps_dense_texts_within_the_model_window(  # type: ignore[no-untyped-def]
    real_embedder, make_indexer, tmp_path
) -> None:
    indexer = make_indexer(tmp_path, embedder=real_embedder)
    heading = " > ".join(["A rather long heading about retention and records policy"] * 8)
    section = Section("The retention rules say many things. " * 200, heading=heading)
    identity = "Acme Corporation | Records Retention Policy | January 1, 2024"
    room = indexer._room(identity)
    assert room is not None
    assert room(section) < 180
    chunks = chunk_sections([section], real_embedder.token_spans, 180, 32, room=room)
    for chunk in chunks:
        dense = indexer.dense_text(identity, chunk)
        assert len(real_embedder.token_spans(dense)) + 2 <= real_embedder.max_tokens
