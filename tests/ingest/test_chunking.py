import itertools
import re

import pytest

from appliance.protocols import Section
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
