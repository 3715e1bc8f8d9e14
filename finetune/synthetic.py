"""Synthetic question-answer pairs from the indexed documents, written by the local chat model.

For each sampled chunk the model is asked for one question and its short answer. A small model
invents freely, so a pair is kept only when it passes every filter, and each rejection is
counted by its reason (the dataset manifest shows the counts):

    chunk_too_short        the chunk has too few words to ask about (no model call)
    generation_error       the model failed on this chunk
    unparseable            the reply has no "Question: ... Answer: ..." shape
    not_a_question         the question does not end with a question mark
    question_length        the question has too few or too many words
    answer_length          the answer has too few or too many words
    answer_not_in_passage  the answer is not found in the chunk (normalized containment)
    near_duplicate         a kept question is nearly the same (shingle Jaccard)

The model sits behind ``Generate`` (prompt in, text out), so the filters are tested with a
scripted seam and the real model is one ``model_generator`` away.
"""

from __future__ import annotations

import bisect
import itertools
import random
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from appliance.core.audience import collection_of
from appliance.core.errors import ApplianceError
from appliance.core.evaluation import containment, normalize
from appliance.core.protocols import ChatModel, GenerationParams
from finetune.near_duplicates import DEFAULT_THRESHOLD, NearDuplicateIndex

Generate = Callable[[str], str]
"""One model call: the prompt (a single user turn) in, the reply's text out."""

# A plain instruction and a fixed reply shape: SmolLM2-135M keeps the "Question:/Answer:"
# lines with it, while a few-shot example made it answer about the example instead (tried
# here on four passages).
QA_PROMPT = (
    "Read the passage and write one question that it answers, then the short answer copied "
    "from the passage.\n\nPassage:\n{passage}\n\nReply in exactly this form:\n"
    "Question: <question>\nAnswer: <answer>"
)

# The labels, also in markdown bold ("**Question:**"), which small models like to write.
_QUESTION = re.compile(
    r"^\s*\**\s*question\s*\**\s*[:\-]\s*\**\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE
)
_ANSWER = re.compile(
    r"^\s*\**\s*answer\s*\**\s*[:\-]\s*\**\s*(.*)", re.IGNORECASE | re.MULTILINE | re.DOTALL
)
# A sentence ends at . ! or ? followed by space and a capital or digit, so "$1.6 billion" and
# "e.g. the" stay whole.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


@dataclass(frozen=True)
class SourceChunk:
    """An indexed chunk as training data generation sees it."""

    chunk_id: str
    file: str
    location: str
    text: str

    def as_json(self) -> dict[str, str]:
        return {
            "chunk_id": self.chunk_id,
            "file": self.file,
            "location": self.location,
            "text": self.text,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SourceChunk:
        return cls(
            chunk_id=str(data["chunk_id"]),
            file=str(data["file"]),
            location=str(data.get("location") or data["file"]),
            text=str(data["text"]),
        )


@dataclass(frozen=True)
class FilterLimits:
    """What a generated pair must satisfy to be kept."""

    min_chunk_words: int = 20
    min_question_words: int = 4
    max_question_words: int = 40
    min_answer_words: int = 1
    max_answer_words: int = 60
    min_containment: float = 0.8
    """Share of the answer's normalized tokens that the passage must contain, when the answer
    is not a contiguous span of it."""
    near_duplicate_threshold: float = DEFAULT_THRESHOLD


DEFAULT_LIMITS = FilterLimits()


@dataclass(frozen=True)
class SyntheticPair:
    question: str
    answer: str
    chunk: SourceChunk


@dataclass
class SyntheticResult:
    pairs: list[SyntheticPair] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    chunks: int = 0
    """Chunks tried: every one ends as a pair or as exactly one rejection."""


def qa_prompt(passage: str) -> str:
    return QA_PROMPT.format(passage=passage.strip())


def first_sentence(text: str) -> str:
    """The opening sentence: asked for a short answer, the small model states it first and
    then tends to run on into invented detail, which would fail the grounding check."""
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0].strip()


def parse_reply(text: str) -> tuple[str, str] | None:
    """(question, answer) from a "Question: ...\\nAnswer: ..." reply, or None."""
    question = _QUESTION.search(text)
    answer = _ANSWER.search(text)
    if question is None or answer is None or answer.start() < question.start():
        return None
    q = question.group(1).strip().strip('"').strip()
    a = first_sentence(answer.group(1).strip().splitlines()[0] if answer.group(1).strip() else "")
    a = a.strip().strip('"').strip()
    if not q or not a:
        return None
    return q, a


def answer_in_passage(answer: str, passage: str, min_containment: float = 0.8) -> bool:
    """Whether the passage holds the answer: as a contiguous normalized span, or with at least
    ``min_containment`` of the answer's tokens present."""
    tokens = normalize(answer)
    if not tokens:
        return False
    span = " " + " ".join(tokens) + " "
    if span in " " + " ".join(normalize(passage)) + " ":
        return True
    return containment(passage, answer) >= min_containment


def check_pair(
    question: str, answer: str, passage: str, limits: FilterLimits = DEFAULT_LIMITS
) -> str | None:
    """The reason to reject a pair (see the module docstring), or None to keep it."""
    if not question.rstrip().endswith("?"):
        return "not_a_question"
    if not limits.min_question_words <= len(question.split()) <= limits.max_question_words:
        return "question_length"
    if not limits.min_answer_words <= len(answer.split()) <= limits.max_answer_words:
        return "answer_length"
    if not answer_in_passage(answer, passage, limits.min_containment):
        return "answer_not_in_passage"
    return None


def generate_pairs(
    chunks: Sequence[SourceChunk],
    generate: Generate,
    *,
    limits: FilterLimits = DEFAULT_LIMITS,
    seen: NearDuplicateIndex | None = None,
) -> SyntheticResult:
    """Ask for a pair per chunk, in the given order, and keep those that pass the filters.
    ``seen`` may hold questions from elsewhere that new ones must not repeat."""
    index = seen or NearDuplicateIndex(limits.near_duplicate_threshold)
    result = SyntheticResult()
    for chunk in chunks:
        result.chunks += 1
        if len(chunk.text.split()) < limits.min_chunk_words:
            result.rejected["chunk_too_short"] += 1
            continue
        try:
            reply = generate(qa_prompt(chunk.text))
        except ApplianceError:
            # one bad chunk (a prompt over the context, a model hiccup) must not sink the build
            result.rejected["generation_error"] += 1
            continue
        parsed = parse_reply(reply)
        if parsed is None:
            result.rejected["unparseable"] += 1
            continue
        question, answer = parsed
        reason = check_pair(question, answer, chunk.text, limits)
        if reason is None and not index.add_if_new(question):
            reason = "near_duplicate"
        if reason is not None:
            result.rejected[reason] += 1
            continue
        result.pairs.append(SyntheticPair(question, answer, chunk))
    return result


# --- where chunks come from ---------------------------------------------------------------------


class ChunkState(Protocol):
    """What sampling needs of the ingestion state (``ingest.state.IngestState``)."""

    def live_counts(self, collection: str) -> dict[str, int]: ...

    def live_chunks_of_path(
        self, collection: str, path: str, sha256: str | None = None
    ) -> list[Any]: ...


def _location(path: str, page: int | None, heading: str | None) -> str:
    if page is not None:
        return f"{path}, page {page}"
    if heading:
        return f"{path}, section {heading}"
    return path


def sample_chunks(
    state: ChunkState,
    collection: str,
    limit: int,
    seed: int,
    *,
    readable: Collection[str] | None = None,
) -> list[SourceChunk]:
    """A seeded sample of ``limit`` live chunks of a collection, read from the ingestion state
    (which keeps every chunk's text), without loading all texts: positions are drawn from the
    per-file counts and only the files drawn are read. ``readable``: only documents of these
    document collections (top-level folders; ``""`` the shared one); None: all."""
    counts = sorted(
        (path, n)
        for path, n in state.live_counts(collection).items()
        if readable is None or collection_of(path) in readable
    )
    total = sum(n for _path, n in counts)
    if total == 0 or limit <= 0:
        return []
    picks = random.Random(seed).sample(range(total), min(limit, total))
    starts = list(itertools.accumulate((n for _path, n in counts), initial=0))
    wanted: dict[str, list[tuple[int, int]]] = {}
    for order, position in enumerate(picks):
        i = bisect.bisect_right(starts, position) - 1
        wanted.setdefault(counts[i][0], []).append((order, position - starts[i]))
    drawn: list[tuple[int, SourceChunk]] = []
    for path, positions in wanted.items():
        rows = state.live_chunks_of_path(collection, path)
        for order, offset in positions:
            if offset < len(rows):  # the file changed between the two reads: skip, not fail
                row = rows[offset]
                chunk = row.chunk
                drawn.append(
                    (
                        order,
                        SourceChunk(
                            chunk_id=str(row.point_id),
                            file=path,
                            location=_location(path, chunk.page, chunk.heading),
                            text=chunk.text,
                        ),
                    )
                )
    return [chunk for _order, chunk in sorted(drawn, key=lambda d: d[0])]


@contextmanager
def model_generator(
    model: ChatModel, *, seed: int = 0, max_tokens: int = 96
) -> Iterator[tuple[Generate, str]]:
    """A chat model (built by the caller, from the settings: ``appliance.chat.factory``) as a
    ``Generate`` (greedy, seeded) and its name; the model is closed on exit."""
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0, seed=seed)
    try:

        def generate(prompt: str) -> str:
            text, _stats = model.complete([{"role": "user", "content": prompt}], params)
            return text

        yield generate, model.name
    finally:
        model.close()
