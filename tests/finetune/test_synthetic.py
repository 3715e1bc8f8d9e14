"""Synthetic question-answer pairs: the reply parser, the filters with a scripted model, chunk
sampling from a real index, near-duplicate detection, and the real default model on real chunks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.chat.factory import build_chat_model
from appliance.core.chat_settings import ChatSettings
from appliance.core.errors import ModelError
from finetune.near_duplicates import NearDuplicateIndex, deduplicate, shingles, similarity
from finetune.synthetic import (
    FilterLimits,
    SourceChunk,
    answer_in_passage,
    check_pair,
    generate_pairs,
    model_generator,
    parse_reply,
    sample_chunks,
)

PASSAGE = (
    "The appliance retains audit logs for 7 years under policy AP-12. Only administrators may "
    "export audit logs, and every export is itself recorded with the name of the administrator "
    "and the time of the export."
)
POLICIES = {
    "retention.md": "# Retention\n\n" + PASSAGE + "\n",
    "delivery.md": (
        "# Delivery terms\n\nThe supplier shall deliver the goods within 30 days of the order. "
        "Late deliveries incur a penalty of 2 percent of the order value for every week of "
        "delay, up to a maximum of 10 percent, after which the buyer may cancel the order.\n"
    ),
    "leave.md": (
        "# Annual leave\n\nEvery employee is entitled to 28 days of paid annual leave per "
        "calendar year. Up to 5 unused days may be carried over into the first quarter of the "
        "next year with the written approval of the line manager.\n"
    ),
}


def chunk(text: str = PASSAGE, n: int = 0) -> SourceChunk:
    return SourceChunk(chunk_id=f"c{n}", file="policy.md", location="policy.md", text=text)


def scripted(*replies: str | Exception) -> Callable[[str], str]:
    """A model that gives these replies in turn (an exception is raised instead)."""
    queue = list(replies)

    def generate(prompt: str) -> str:
        assert "Passage:" in prompt
        reply = queue.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    return generate


# --- parsing and filters --------------------------------------------------------------------------


def test_parse_reply_shapes() -> None:
    assert parse_reply("Question: How long are logs kept?\nAnswer: 7 years.") == (
        "How long are logs kept?",
        "7 years.",
    )
    # markdown bold labels, and an answer that runs on: only its first sentence is kept
    assert parse_reply(
        "**Question:** Who may export logs?\n**Answer:** Only administrators. They also..."
    ) == ("Who may export logs?", "Only administrators.")
    assert parse_reply("Question: What is it?") is None
    assert parse_reply("Answer: 7 years\nQuestion: What?") is None
    assert parse_reply("Question: What is it?\nAnswer:") is None
    assert parse_reply("no shape at all") is None


def test_answer_in_passage() -> None:
    assert answer_in_passage("retains audit logs for 7 years", PASSAGE)
    # not a contiguous span, but 8 of its 10 tokens are in the passage
    assert answer_in_passage("Audit logs are kept for 7 years under policy AP-12", PASSAGE)
    assert not answer_in_passage("audit logs are kept for 10 years in the cloud", PASSAGE)
    assert not answer_in_passage("", PASSAGE)


def test_check_pair_reasons() -> None:
    ok = "How long does the appliance retain audit logs?"
    assert check_pair(ok, "7 years", PASSAGE) is None
    assert check_pair("Tell me about the logs.", "7 years", PASSAGE) == "not_a_question"
    assert check_pair("Logs?", "7 years", PASSAGE) == "question_length"
    assert check_pair(ok, " ".join(["years"] * 61), PASSAGE) == "answer_length"
    assert check_pair(ok, "ten years in the cloud", PASSAGE) == "answer_not_in_passage"
    assert check_pair(ok, "x", PASSAGE, FilterLimits(min_answer_words=2)) == "answer_length"


def test_generate_pairs_counts_every_rejection() -> None:
    chunks = [chunk(n=i) for i in range(7)] + [chunk("Too short to ask about.", 7)]
    generate = scripted(
        "Question: How long does the appliance retain audit logs?\nAnswer: for 7 years",
        "Question: How long does the appliance retain the audit logs?\nAnswer: 7 years",
        "I cannot do that.",
        "Question: Who may export audit logs from the appliance?\nAnswer: the finance team",
        "Question: Policy?\nAnswer: AP-12",
        ModelError("the prompt is longer than the context"),
        "Question: Which policy sets the retention of audit logs?\nAnswer: policy AP-12",
    )
    result = generate_pairs(chunks, generate)
    assert [p.question for p in result.pairs] == [
        "How long does the appliance retain audit logs?",
        "Which policy sets the retention of audit logs?",
    ]
    assert result.rejected == {
        "near_duplicate": 1,
        "unparseable": 1,
        "answer_not_in_passage": 1,
        "question_length": 1,
        "generation_error": 1,
        "chunk_too_short": 1,
    }
    assert result.chunks == len(chunks) == len(result.pairs) + sum(result.rejected.values())


# --- sampling chunks from a real index ------------------------------------------------------------


def test_sample_chunks_is_seeded_and_reads_real_chunks(tmp_path: Path, make_indexer) -> None:  # type: ignore[no-untyped-def]
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in POLICIES.items():
        (docs / name).write_text(text)
    indexer = make_indexer(docs)
    indexer.reconcile()
    state, collection = indexer.state, indexer.collection
    total = sum(state.live_counts(collection).values())
    assert total >= 3

    first = sample_chunks(state, collection, 2, seed=1)
    assert first == sample_chunks(state, collection, 2, seed=1)
    assert len({c.chunk_id for c in first}) == len(first) == 2
    everything = sample_chunks(state, collection, 1000, seed=1)
    assert len(everything) == total
    assert {c.file for c in everything} == set(POLICIES)
    assert any("28 days of paid annual leave" in c.text for c in everything)
    orders = {
        tuple(c.chunk_id for c in sample_chunks(state, collection, total, s)) for s in range(6)
    }
    assert len(orders) > 1  # the seed changes the draw
    assert sample_chunks(state, "no_such_collection", 5, 0) == []


# --- near duplicates ------------------------------------------------------------------------------


def test_shingles_and_similarity() -> None:
    assert shingles("The cat sat on the mat") == {"cat sat on", "sat on mat"}
    assert shingles("Hello world") == {"hello world"}  # shorter than n: one whole shingle
    assert shingles("") == frozenset()
    a = "What were Apple's total net sales in the third quarter of fiscal 2023?"
    b = "What was Apple's total net sales in the third quarter of fiscal 2023"
    assert 0.6 < similarity(a, b) < 1
    assert similarity(a, a.upper()) == 1.0
    assert similarity(a, "Who approves annual leave carried over into the next year?") == 0
    assert similarity("", "") == 0


def test_near_duplicate_index_and_deduplicate() -> None:
    index = NearDuplicateIndex(threshold=0.6)
    assert index.add_if_new("How long does the appliance retain audit logs?", key="q1")
    assert index.match("How long does the appliance retain its audit logs?") is None  # 3 of 8
    assert index.match("how long does the appliance retain audit logs") == "q1"
    assert not index.add_if_new("How long does an appliance retain audit logs?")
    assert len(index) == 1
    texts = [
        "the supplier shall deliver the goods within 30 days",
        "The supplier shall deliver the goods within 30 days.",
        "late deliveries incur a penalty of 2 percent per week",
        "the supplier shall deliver all goods within 30 days",
    ]
    assert deduplicate(texts, threshold=0.9) == [0, 2, 3]
    assert deduplicate(texts, threshold=0.3) == [0, 2]
    with pytest.raises(ValueError, match="threshold"):
        NearDuplicateIndex(threshold=0)


# --- the real default model -----------------------------------------------------------------------


@pytest.mark.slow  # two passes of the real model over 3 chunks: about 25 s on 2 busy cores
def test_real_model_writes_filtered_pairs_from_real_chunks(tmp_path: Path, make_indexer) -> None:  # type: ignore[no-untyped-def]
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in POLICIES.items():
        (docs / name).write_text(text)
    indexer = make_indexer(docs)
    indexer.reconcile()
    chunks = sample_chunks(indexer.state, indexer.collection, 3, seed=0)
    assert len(chunks) == 3
    replies: list[str] = []
    started = time.perf_counter()
    with model_generator(build_chat_model(ChatSettings(n_threads=2)), seed=0) as (generate, name):

        def recording(prompt: str) -> str:
            replies.append(generate(prompt))
            return replies[-1]

        result = generate_pairs(chunks, recording)
    elapsed = time.perf_counter() - started
    assert name.startswith("SmolLM2-135M-Instruct")
    assert elapsed < 60, elapsed
    assert result.chunks == 3 == len(result.pairs) + sum(result.rejected.values())
    assert len(replies) == 3 - result.rejected["chunk_too_short"]
    for pair in result.pairs:  # whatever the model wrote, what was kept passes every filter
        assert check_pair(pair.question, pair.answer, pair.chunk.text) is None
    # greedy decoding with a seed: the same chunks give the same pairs
    with model_generator(build_chat_model(ChatSettings(n_threads=2)), seed=0) as (generate, _name):
        again = generate_pairs(chunks, generate)
    assert [(p.question, p.answer) for p in again.pairs] == [
        (p.question, p.answer) for p in result.pairs
    ]
