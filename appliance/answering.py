"""Grounded answers: retrieve, merge neighbouring chunks into passages, prompt, stream, cite.

question ─► standalone query (follow-ups) ─► hybrid retrieval (+ optional re-ranking)
         ─► relevance check (abstain) ─► passages within a token budget ─► chat model
         ─► streamed tokens (leak guard) ─► answer + structured sources
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from appliance.chat_models import ChatMessage, ChatModel, GenerationParams
from appliance.chat_settings import ChatSettings
from appliance.conversations import ConversationStore, Exchange, standalone_question
from appliance.errors import ConfigError, missing_dependency
from appliance.prompting import (
    LeakGuard,
    Passage,
    clean_citations,
    is_no_answer,
    system_prompt,
    user_prompt,
    words,
)
from appliance.protocols import Embedder, Hit, SparseEncoder, VectorStore
from appliance.settings import AnswerSettings
from ingest.retrieval import retrieve

log = logging.getLogger(__name__)

REFUSAL = "I can't share that. Please ask a question about the documents."


@dataclass(frozen=True)
class Source:
    """A cited passage: where it is and what it says."""

    number: int
    path: str
    page: int | None
    heading: str | None
    text: str
    score: float
    start: int
    end: int
    doc_hash: str
    ocr_confidence: float | None = None
    """Set where the passage was read from a scan by OCR (the UI says so when citing it)."""

    @classmethod
    def of(cls, p: Passage) -> Source:
        return cls(
            p.number,
            p.path,
            p.page,
            p.heading,
            p.text,
            p.score,
            p.start,
            p.end,
            p.doc_hash,
            p.ocr_confidence,
        )


@dataclass
class Answer:
    question: str
    answer: str
    sources: list[Source]
    abstained: bool
    query: str
    """The standalone query that was searched (differs from ``question`` for follow-ups)."""
    retrieved: list[dict[str, Any]] = field(default_factory=list)
    """Every chunk retrieved, in rank order: path, chunk id, document hash, score (for the
    evaluation harness and the audit log)."""
    relevance: float = 0.0
    model: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    redacted: bool = False

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Prepared:
    """A question ready for generation."""

    answer: Answer
    """Filled in so far: query, retrieved chunks, relevance, retrieval time."""
    passages: list[Passage]
    messages: list[ChatMessage]
    started: float


class SearchIndex(Protocol):
    """What answering needs of an index (an ``ingest.pipeline.Indexer``)."""

    store: VectorStore
    embedder: Embedder
    sparse: SparseEncoder


class CrossEncoderReranker:
    """Re-ranks chunks with a local sentence-transformers CrossEncoder folder."""

    def __init__(self, folder: Path) -> None:
        if not folder.is_dir():
            raise ConfigError(f"answer.rerank_model_path {folder} is not a folder")
        try:
            from sentence_transformers import CrossEncoder
        except ImportError as exc:
            raise missing_dependency(
                "sentence_transformers", package="sentence-transformers"
            ) from exc
        self._model = CrossEncoder(str(folder), device="cpu", local_files_only=True)

    def rerank(self, query: str, hits: list[Hit]) -> list[Hit]:
        if not hits:
            return hits
        scores = self._model.predict([(query, str(h.payload.get("text", ""))) for h in hits])
        order = sorted(range(len(hits)), key=lambda i: -float(scores[i]))
        return [Hit(hits[i].id, float(scores[i]), hits[i].payload) for i in order]


def merge_passages(hits: Sequence[Hit]) -> list[Passage]:
    """Merge chunks of one document that overlap or touch into passages, best first."""
    groups: dict[tuple[str, str], list[Hit]] = {}
    for hit in hits:
        key = (str(hit.payload.get("path")), str(hit.payload.get("doc_hash")))
        groups.setdefault(key, []).append(hit)
    rank = {hit.id: i for i, hit in enumerate(hits)}
    merged: list[tuple[int, Passage]] = []
    for (path, doc_hash), group in groups.items():
        group.sort(key=lambda h: int(h.payload.get("start", 0)))
        runs: list[list[Hit]] = [[group[0]]]
        for hit in group[1:]:
            last = runs[-1][-1]
            touching = int(hit.payload.get("start", 0)) <= int(last.payload.get("end", 0)) + 2
            neighbours = (
                int(hit.payload.get("chunk_index", -9)) - int(last.payload.get("chunk_index", -99))
                == 1
            )
            same_place = hit.payload.get("page") == last.payload.get("page")
            if (touching or neighbours) and same_place:
                runs[-1].append(hit)
            else:
                runs.append([hit])
        for run in runs:
            text = str(run[0].payload.get("text", ""))
            end = int(run[0].payload.get("end", 0))
            for hit in run[1:]:
                start, chunk = int(hit.payload.get("start", 0)), str(hit.payload.get("text", ""))
                overlap = max(0, end - start)
                text += ("" if overlap else "\n") + chunk[overlap:]
                end = max(end, int(hit.payload.get("end", 0)))
            merged.append(
                (
                    min(rank[h.id] for h in run),
                    Passage(
                        number=0,
                        path=path,
                        page=run[0].payload.get("page"),
                        heading=run[0].payload.get("heading"),
                        text=text,
                        score=max(h.score for h in run),
                        start=int(run[0].payload.get("start", 0)),
                        end=end,
                        doc_hash=doc_hash,
                        chunk_ids=tuple(h.id for h in run),
                        ocr_confidence=_ocr_confidence(run),
                    ),
                )
            )
    merged.sort(key=lambda m: m[0])
    return [replace(p, number=i) for i, (_rank, p) in enumerate(merged, 1)]


def _ocr_confidence(run: Sequence[Hit]) -> float | None:
    """The lowest OCR confidence of a run's chunks; None when none was OCR'd."""
    values = [h.payload.get("ocr_confidence") for h in run]
    known = [float(v) for v in values if v is not None]
    return min(known) if known else None


def _overlap(answer: str, passage: str) -> float:
    """The share of the answer's content words that the passage contains."""
    answer_words = {w for w in words(answer) if len(w) > 3 or w.isdigit()}
    if not answer_words:
        return 0.0
    return len(answer_words & set(words(passage))) / len(answer_words)


class Answerer:
    """Answers questions from one store collection with one chat model."""

    def __init__(
        self,
        *,
        index: Callable[[], SearchIndex],
        chat: ChatModel,
        settings: AnswerSettings,
        chat_settings: ChatSettings,
        reranker: CrossEncoderReranker | None = None,
    ) -> None:
        self._index = index
        self.chat = chat
        self.settings = settings
        self.chat_settings = chat_settings
        self.reranker = reranker
        self.system = system_prompt(settings.system_prompt)

    # --- retrieval ---------------------------------------------------------------------------

    def relevant_passages(self, query: str, hits: Sequence[Hit]) -> list[Passage]:
        """Merged passages scored by cosine similarity to the query (comparable across
        questions, unlike fused ranks), best first, keeping those within ``passage_margin`` of
        the best: a small model answers better from two good passages than from five mixed."""
        passages = merge_passages(hits)
        if not passages:
            return []
        embedder = self._index().embedder
        query_vec = embedder.embed_query(query)
        vectors = embedder.embed([p.text for p in passages])
        scored = sorted(
            (
                (sum(a * b for a, b in zip(query_vec, vec, strict=True)), i, p)
                for i, (p, vec) in enumerate(zip(passages, vectors, strict=True))
            ),
            key=lambda s: (-s[0], s[1]),
        )
        floor = scored[0][0] - self.settings.passage_margin
        return [replace(p, score=round(cos, 4)) for cos, _i, p in scored if cos >= floor]

    def retrieve(self, query: str, where: Mapping[str, Sequence[str]] | None = None) -> list[Hit]:
        k = self.settings.top_k
        index = self._index()
        hits = retrieve(
            index.store,
            index.embedder,
            index.sparse,
            query,
            k * 3 if self.reranker else k,
            mode=self.settings.retrieval_mode,
            where=where,
        )
        if self.reranker is not None:
            hits = self.reranker.rerank(query, hits)[:k]
        return hits

    def passages(self, candidates: Sequence[Passage]) -> list[Passage]:
        """The passages that fit the context token budget, best first, renumbered."""
        budget = self.settings.context_tokens
        chosen: list[Passage] = []
        for passage in candidates:
            cost = self.chat.count_tokens(passage.text) + 16
            if cost > budget:
                if not chosen:  # the best passage alone is too long: keep its start
                    keep = int(len(passage.text) * budget / cost)
                    chosen.append(
                        replace(passage, text=passage.text[:keep], end=passage.start + keep)
                    )
                break
            chosen.append(passage)
            budget -= cost
        return [replace(p, number=i) for i, p in enumerate(chosen, 1)]

    # --- answering ---------------------------------------------------------------------------

    def prepare(
        self,
        question: str,
        *,
        history: Sequence[Exchange] = (),
        where: Mapping[str, Sequence[str]] | None = None,
    ) -> Prepared:
        """Everything before generation: the query, the retrieval, the passages, the prompt."""
        started = time.perf_counter()
        query = standalone_question(question, history, self.settings.history_turns)
        hits = self.retrieve(query, where)
        candidates = self.relevant_passages(query, hits)
        relevance = candidates[0].score if candidates else 0.0
        retrieved = [
            {
                "path": h.payload.get("path"),
                "chunk_id": h.id,
                "doc_hash": h.payload.get("doc_hash"),
                "page": h.payload.get("page"),
                "score": h.score,
            }
            for h in hits
        ]
        timings: dict[str, float] = {"retrieval_s": round(time.perf_counter() - started, 4)}
        answer = Answer(
            question=question,
            answer="",
            sources=[],
            abstained=False,
            query=query,
            retrieved=retrieved,
            relevance=round(relevance, 4),
            model=self.chat.name,
            timings=timings,
        )
        passages = self.passages(candidates)
        messages: list[ChatMessage] = [
            {"role": "system", "content": self.system},
            {"role": "user", "content": user_prompt(question, passages)},
        ]
        return Prepared(answer, passages, messages, started)

    def stream(
        self,
        question: str,
        *,
        history: Sequence[Exchange] = (),
        where: Mapping[str, Sequence[str]] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield ``{"type": "token", "text"}`` events as the answer is generated, then one
        ``{"type": "answer", "answer": Answer}``."""
        prepared = self.prepare(question, history=history, where=where)
        answer, passages, messages, started = (
            prepared.answer,
            prepared.passages,
            prepared.messages,
            prepared.started,
        )
        timings = answer.timings
        if not passages or answer.relevance < self.settings.min_relevance:
            answer.abstained = True
            answer.answer = self._abstention(passages)
            timings["total_s"] = round(time.perf_counter() - started, 4)
            yield {"type": "token", "text": answer.answer}
            yield {"type": "answer", "answer": answer}
            return
        guard = LeakGuard(self.system)
        params = GenerationParams(
            max_tokens=self.chat_settings.max_tokens,
            temperature=self.chat_settings.temperature,
            seed=self.chat_settings.seed,
        )
        first: float | None = None
        with self.chat.stream(messages, params) as pieces:
            for piece in pieces:
                shown = guard.feed(piece)
                if shown:
                    first = first or time.perf_counter()
                    yield {"type": "token", "text": shown}
                if guard.leaked:
                    break
            tail = guard.flush()
            if tail:
                first = first or time.perf_counter()
                yield {"type": "token", "text": tail}
            stats = pieces.stats
        raw = guard.text
        if guard.leaked:
            log.warning("an answer began to recite the system prompt; the recitation was cut")
            answer.redacted = True
            raw = guard.clean_prefix
        if not raw.strip() and guard.leaked:
            answer.answer = REFUSAL
        else:
            answer.answer, cited = clean_citations(raw, len(passages))
            answer.sources = self._sources(answer.answer, passages, cited)
            if is_no_answer(answer.answer):
                answer.abstained = True
                answer.answer = self._abstention(passages)
                answer.sources = []
        now = time.perf_counter()
        timings["ttft_s"] = round((first or now) - started, 4)
        timings["total_s"] = round(now - started, 4)
        if stats is not None:
            timings["tokens_per_s"] = round(stats.tokens_per_s, 2)
            timings["completion_tokens"] = stats.completion_tokens
            timings["prompt_tokens"] = stats.prompt_tokens
        yield {"type": "answer", "answer": answer}

    def answer(
        self,
        question: str,
        *,
        history: Sequence[Exchange] = (),
        where: Mapping[str, Sequence[str]] | None = None,
    ) -> Answer:
        final: Answer | None = None
        for event in self.stream(question, history=history, where=where):
            if event["type"] == "answer":
                final = event["answer"]
        assert final is not None
        return final

    def _sources(self, text: str, passages: Sequence[Passage], cited: list[int]) -> list[Source]:
        """The cited passages; when the model cited none, those the answer draws on."""
        by_number = {p.number: p for p in passages}
        if cited:
            return [Source.of(by_number[n]) for n in cited]
        scored = sorted(passages, key=lambda p: -_overlap(text, p.text))
        best = [p for p in scored if _overlap(text, p.text) >= 0.5]
        return [Source.of(p) for p in (best[:3] or scored[:1])]

    def _abstention(self, passages: Sequence[Passage]) -> str:
        closest: list[str] = []
        for p in passages:
            if p.path not in closest:
                closest.append(p.path)
        message = "The documents do not cover this question."
        if closest:
            message += " The closest documents are: " + "; ".join(closest[:3]) + "."
        return message


def ask_events(
    answerer: Answerer,
    conversations: ConversationStore | None,
    question: str,
    *,
    user: str,
    conversation: str | None = None,
    where: Mapping[str, Sequence[str]] | None = None,
) -> Iterator[dict[str, Any]]:
    """One question in a conversation: history in, JSON-ready events out, the exchange saved.
    The final event is ``{"type": "answer", "answer": {...}, "conversation": id}``."""
    question = question.strip()
    if not question:
        raise ValueError("the question is empty")
    history: list[Exchange] = []
    if conversations is not None:
        if conversation:
            history = conversations.history(user, conversation)
        else:
            conversation = conversations.create(user, question)
    for event in answerer.stream(question, history=history, where=where):
        if event["type"] != "answer":
            yield event
            continue
        answer = event["answer"].as_json()
        message = None
        if conversations is not None and conversation is not None:
            message = conversations.add(user, conversation, answer)
        yield {"type": "answer", "answer": answer, "conversation": conversation, "message": message}
