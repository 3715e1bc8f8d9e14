"""Grounded answers: retrieve, merge neighbouring chunks into passages, prompt, stream, check,
cite.

question ─► standalone query (follow-ups) ─► hybrid retrieval (+ optional re-ranking)
         ─► passages within a token budget ─► "sources" event (best-matching spans) ─►
         ─► relevance check (abstain) ─► the model's turn (queue places, appliance.turnstile)
         ─► chat model ─► streamed tokens (leak guard)
         ─► each finished sentence checked against the passages it cites ("claim" events)
         ─► answer: the supported sentences (unsupported ones dropped or flagged), or, when
            none is left, quotes of the passage sentences that best answer the question

Events of ``Answerer.stream``, in order: ``sources``, ``queue``... (only while waiting),
``token``..., ``claim``... (interleaved with tokens), ``answer``. The contract is in
docs/answers.md.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from appliance.conversations import ConversationStore, Exchange, standalone_question
from appliance.core.audience import readable_of, served_by
from appliance.core.chat_settings import ChatSettings
from appliance.core.embedding_cache import CachedEmbedder
from appliance.core.errors import ConfigError, missing_dependency
from appliance.core.figures import extract_figures
from appliance.core.injection import InstructionDetector
from appliance.core.prompting import (
    LeakGuard,
    Passage,
    clean_citations,
    is_no_answer,
    quotable_text,
    system_prompt,
    user_prompt,
    words,
)
from appliance.core.protocols import (
    ChatMessage,
    ChatModel,
    Embedder,
    GenerationParams,
    Hit,
    SearchMode,
)
from appliance.core.settings import AnswerSettings
from appliance.core.torch_threads import intra_op_threads
from appliance.turnstile import ModelQueue, Ticket, Unqueued
from appliance.verification import (
    Claim,
    Embed,
    Verifier,
    cited_numbers,
    finished_sentences,
    sentence_spans,
)

log = logging.getLogger(__name__)

REFUSAL = "I can't share that. Please ask a question about the documents."
QUOTE_LABEL = "Quoted from the documents:"
UNVERIFIED = "[unverified] "
MAX_QUOTES = 3
QUOTE_FIGURE_BONUS = 0.1
"""Quotes that state figures rank higher: questions about documents like these mostly ask for
amounts, dates and rates."""
_FIGURE = re.compile(r"\d")
MIN_SUPPORTED = 2
"""An answer with fewer supported sentences than this is followed by quotes of the passages
that best answer the question: one sentence left of an answer rarely answers it."""
QUOTE_POOL = 16
"""Segments considered for quotes: the best by words and figures, re-scored with the embedding
model (``Verifier.evidence``)."""
QUOTE_MARGIN = 0.3
"""Quotes after the best one are kept while they score at most this much less."""


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
    spans: list[list[int]] = field(default_factory=list)
    """``[start, end]`` ranges of ``text`` to highlight: the spans that support the answer's
    sentences citing this source, else those that best match the question."""
    ocr_confidence: float | None = None
    """Set where the passage was read from a scan by OCR (the UI says so when citing it)."""

    @classmethod
    def of(cls, p: Passage, spans: Sequence[Sequence[int]] = ()) -> Source:
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
            [[int(a), int(b)] for a, b in spans],
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
    claims: list[dict[str, Any]] = field(default_factory=list)
    """Every sentence of the generated answer, checked (``Claim.as_json`` plus ``shown``); in
    quoted mode, the quotes."""
    unsupported_claims: list[dict[str, Any]] = field(default_factory=list)
    """The generated sentences the passages do not support."""
    mode: str = "generated"
    """generated: the model's supported sentences; quoted: passage sentences, verbatim."""
    served_by: dict[str, Any] = field(default_factory=dict)
    """The model that answered: ``{"version", "name", "audience"}`` (``appliance.core.audience``);
    the version is the one this reader may be answered by, which need not be the active one."""

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
    """What answering needs of an index (an ``ingest.pipeline.Indexer``): its embedding model
    and its retrieval (``ingest.retrieval``, which answering does not import: the index
    brings it)."""

    embedder: Embedder

    def retrieve(
        self,
        query: str,
        k: int,
        *,
        mode: SearchMode = "hybrid",
        where: Mapping[str, Sequence[str]] | None = None,
        embedder: Embedder | None = None,
    ) -> list[Hit]: ...


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
        queue: ModelQueue | None = None,
    ) -> None:
        self._index = index
        self.chat = chat
        self.queue: ModelQueue = queue or Unqueued()
        """The line in front of the model: while a question waits, its stream tells its place."""
        self.settings = settings
        self.chat_settings = chat_settings
        self.reranker = reranker
        self.system = system_prompt(settings.system_prompt, settings.document_marking)
        self._detectors: dict[str, InstructionDetector] = {}
        self._embedders: dict[str, CachedEmbedder] = {}

    def _embedder(self) -> CachedEmbedder:
        """The index's embedding model, with answering's cache (one per model: vectors belong
        to the model that made them)."""
        embedder = self._index().embedder
        key = embedder.model_id
        cached = self._embedders.get(key)
        if cached is None:
            cached = self._embedders[key] = CachedEmbedder(embedder, self.settings.embedding_cache)
        return cached

    def _detector(self) -> InstructionDetector | None:
        """Instruction-like sentences in any language, judged with the index's own embedding
        model (one detector per model: its exemplar vectors belong to that model)."""
        if not self.settings.detect_instructions:
            return None
        embedder = self._embedder()
        key = embedder.model_id
        if key not in self._detectors:
            self._detectors[key] = InstructionDetector(embedder)
        return self._detectors[key]

    # --- retrieval ---------------------------------------------------------------------------

    def relevant_passages(self, query: str, hits: Sequence[Hit]) -> list[Passage]:
        """Merged passages scored by cosine similarity to the query (comparable across
        questions, unlike fused ranks), best first, keeping those within ``passage_margin`` of
        the best: a small model answers better from two good passages than from five mixed."""
        passages = merge_passages(hits)
        if not passages:
            return []
        embedder = self._embedder()
        query_vec = embedder.embed_query(query)
        vectors = embedder.embed([p.text for p in passages], urgent=True)
        scored = sorted(
            (
                (sum(a * b for a, b in zip(query_vec, vec, strict=True)), i, p)
                for i, (p, vec) in enumerate(zip(passages, vectors, strict=True))
            ),
            key=lambda s: (-s[0], s[1]),
        )
        floor = scored[0][0] - self.settings.passage_margin
        return [replace(p, score=round(cos, 4)) for cos, _i, p in scored if cos >= floor]

    def with_chat(self, chat: ChatModel) -> Answerer:
        """The same retrieval and settings answering with ``chat`` (a candidate under
        evaluation); it shares this answerer's index and does not own ``chat``."""
        return Answerer(
            index=self._index,
            chat=chat,
            settings=self.settings,
            chat_settings=self.chat_settings,
            reranker=self.reranker,
        )

    def retrieve(self, query: str, where: Mapping[str, Sequence[str]] | None = None) -> list[Hit]:
        k = self.settings.top_k
        hits = self._index().retrieve(
            query,
            k * 3 if self.reranker else k,
            mode=self.settings.retrieval_mode,
            where=where,
            embedder=self._embedder(),
        )
        if self.reranker is not None:
            hits = self.reranker.rerank(query, hits)[:k]
        return hits

    def passages(
        self, candidates: Sequence[Passage], chat: ChatModel | None = None
    ) -> list[Passage]:
        """The passages that fit the context token budget, best first, renumbered."""
        budget = self.settings.context_tokens
        chosen: list[Passage] = []
        for passage in candidates:
            cost = (chat or self.chat).count_tokens(passage.text) + 16
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

    def chat_for(self, where: Mapping[str, Sequence[str]] | None) -> ChatModel:
        """The model that answers a reader bounded by ``where``: with the model registry, the
        version whose audience the reader is granted (``appliance.core.audience``), held open until
        it is closed; otherwise the one configured model."""
        serve = getattr(self.chat, "serve", None)
        return self.chat if serve is None else serve(readable_of(where))

    def prepare(
        self,
        question: str,
        *,
        history: Sequence[Exchange] = (),
        where: Mapping[str, Sequence[str]] | None = None,
        prompt: bool = True,
        chat: ChatModel | None = None,
    ) -> Prepared:
        """Everything before generation: the query, the retrieval, the passages, the prompt
        (left empty without ``prompt``: ``stream`` builds it after sending the evidence).
        ``chat``: the model that will answer (default: ``self.chat``)."""
        chat = chat or self.chat
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
                "text": h.payload.get("text"),
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
            model=chat.name,
            timings=timings,
            served_by=getattr(chat, "served_by", None) or served_by(None, chat.name, None),
        )
        passages = self.passages(candidates, chat)
        messages = self.messages(question, passages) if prompt else []
        return Prepared(answer, passages, messages, started)

    def messages(self, question: str, passages: Sequence[Passage]) -> list[ChatMessage]:
        """The prompt: the system rules, then the passages (instruction-like sentences in them
        marked, which embeds their sentences) and the question."""
        return [
            {"role": "system", "content": self.system},
            {
                "role": "user",
                "content": user_prompt(
                    question, list(passages), self._detector(), self.settings.document_marking
                ),
            },
        ]

    def verifier(self, passages: Sequence[Passage]) -> Verifier:
        """A claim verifier over one answer's passages, with the loaded embedding model."""
        return Verifier(
            passages,
            _one_thread(self._embedder().embed),
            threshold=self.settings.support_threshold,
            lexical_weight=self.settings.support_lexical_weight,
        )

    def stream(
        self,
        question: str,
        *,
        history: Sequence[Exchange] = (),
        where: Mapping[str, Sequence[str]] | None = None,
        ticket: Ticket | None = None,
    ) -> Iterator[dict[str, Any]]:
        """The events of one answer (``_stream``), by the model this reader may be answered
        by (``chat_for``), which is held open until the answer ends or is abandoned."""
        chat = self.chat_for(where)
        try:
            yield from self._stream(chat, question, history=history, where=where, ticket=ticket)
        finally:
            if chat is not self.chat:
                chat.close()

    def _stream(
        self,
        chat: ChatModel,
        question: str,
        *,
        history: Sequence[Exchange] = (),
        where: Mapping[str, Sequence[str]] | None = None,
        ticket: Ticket | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield ``{"type": "sources", "sources": [...]}`` before the model is called,
        ``{"type": "queue", "position"}`` events while the question waits for the model, then
        ``{"type": "token", "text"}`` events as the answer is generated, ``{"type": "claim",
        "claim": {...}}`` as each sentence is finished and checked, and finally one
        ``{"type": "answer", "answer": Answer}``."""
        # the prompt (instruction detection embeds every passage sentence) waits until the
        # evidence is on its way
        prepared = self.prepare(question, history=history, where=where, prompt=False, chat=chat)
        answer, passages, started = prepared.answer, prepared.passages, prepared.started
        timings = answer.timings
        verifier = self.verifier(passages) if passages else None
        checked = time.perf_counter()
        # chosen by words and figures alone: the evidence must not wait for a model call
        evidence = verifier.spans_for(answer.query, embed=False) if verifier else {}
        verify_s = time.perf_counter() - checked
        yield {
            "type": "sources",
            "sources": [asdict(Source.of(p, evidence.get(p.number, []))) for p in passages],
            # for the audit log's question record, written before any answer text is sent
            "retrieved": [{k: v for k, v in r.items() if k != "text"} for r in answer.retrieved],
            "model": answer.model,
            "served_by": answer.served_by,
        }
        if not passages or answer.relevance < self.settings.min_relevance:
            answer.abstained = True
            answer.answer = self._abstention(passages)
            timings["total_s"] = round(time.perf_counter() - started, 4)
            yield {"type": "token", "text": answer.answer}
            yield {"type": "answer", "answer": answer}
            return
        assert verifier is not None
        checking = self.settings.verify
        checks = _Checks(verifier) if checking else None
        try:
            messages = self.messages(question, passages)
            yield from self._generate(
                chat, answer, passages, messages, verifier, checks, started, ticket
            )
        finally:
            if checks is not None:
                checks.close()
        now = time.perf_counter()
        timings.setdefault("ttft_s", round(now - started, 4))
        timings["total_s"] = round(now - started, 4)
        if checks is not None:
            verify_s += checks.waited_s
            timings["verify_work_s"] = round(checks.work_s, 4)
        timings["verify_s"] = round(verify_s, 4)
        yield {"type": "answer", "answer": answer}

    def _generate(
        self,
        chat: ChatModel,
        answer: Answer,
        passages: Sequence[Passage],
        messages: list[ChatMessage],
        verifier: Verifier,
        checks: _Checks | None,
        started: float,
        ticket: Ticket | None,
    ) -> Iterator[dict[str, Any]]:
        """The model's turn: tokens as they come, each finished sentence checked in the
        background while the model writes the next (``_Checks``), then the answer that may be
        shown, in ``answer``."""
        timings = answer.timings
        guard = LeakGuard(self.system)
        params = GenerationParams(
            max_tokens=self.chat_settings.max_tokens,
            temperature=self.chat_settings.temperature,
            seed=self.chat_settings.seed,
        )
        claims: dict[str, Claim] = {}
        shown_text = ""
        done = 0
        if checks is not None:
            # the quotes' evidence, embedded while the question waits and the model reads
            checks.prefetch(answer.query)

        def submit_finished(final: bool) -> None:
            nonlocal done
            assert checks is not None
            spans = sentence_spans(shown_text) if final else finished_sentences(shown_text)
            for s_start, s_end in spans[done:]:
                sentence = clean_citations(shown_text[s_start:s_end], len(passages))[0]
                if sentence:
                    checks.submit(sentence)
            done = max(done, len(spans))

        def claim_events(wait: bool) -> Iterator[dict[str, Any]]:
            assert checks is not None
            for sentence, claim in checks.finished(wait=wait):
                claims[sentence] = claim
                yield {"type": "claim", "claim": claim.as_json()}

        # Waits for the model's turn, yielding {"type": "queue", "position": N} meanwhile.
        # ``ticket``: the place taken in line on arrival (``ModelQueue.admit``), kept during
        # the retrieval above.
        pieces = yield from self.queue.wait(chat.stream(messages, params), ticket)
        with pieces:
            for piece in pieces:
                shown = guard.feed(piece)
                if shown:
                    timings.setdefault("ttft_s", round(time.perf_counter() - started, 4))
                    yield {"type": "token", "text": shown}
                    shown_text += shown
                    if checks is not None:
                        submit_finished(final=False)
                        yield from claim_events(wait=False)
                if guard.leaked:
                    break
            tail = guard.flush()
            if tail:
                timings.setdefault("ttft_s", round(time.perf_counter() - started, 4))
                yield {"type": "token", "text": tail}
                shown_text += tail
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
            elif checks is not None:
                if not guard.leaked:
                    submit_finished(final=True)
                yield from claim_events(wait=True)
                with checks.on_critical_path():
                    checks.wait()  # the verifier is the main thread's again
                    self._checked(answer, passages, verifier, claims)
        if stats is not None:
            timings["tokens_per_s"] = round(stats.tokens_per_s, 2)
            timings["completion_tokens"] = stats.completion_tokens
            timings["prompt_tokens"] = stats.prompt_tokens

    def _checked(
        self,
        answer: Answer,
        passages: Sequence[Passage],
        verifier: Verifier,
        known: dict[str, Claim],
    ) -> None:
        """Replace the generated text by what may be shown: its supported sentences (and, with
        ``answer.unsupported: flag``, the others, marked). When less than
        ``answer.quote_below`` of them is supported, or fewer than ``MIN_SUPPORTED``, the
        passage sentences that best answer the question follow them as quotes (what is left
        of a mostly invented answer is a fragment out of context); with none supported, the
        answer is the quotes alone."""
        text = answer.answer
        spans = sentence_spans(text)
        sentences = [text[a:b] for a, b in spans]
        fresh = [s for s in sentences if s not in known]
        for sentence, claim in zip(fresh, verifier.verify_all(fresh), strict=True):
            known[sentence] = claim
        claims = [known[s] for s in sentences]
        flag = self.settings.unsupported == "flag"
        substantive = [c for c in claims if c.supported and c.source is not None]
        checked = [c for c in claims if c.source is not None or not c.supported]
        answer.unsupported_claims = [c.as_json() for c in claims if not c.supported]
        pieces: list[str] = []
        shown_claims: list[Claim] = []
        if substantive:
            previous_end: int | None = None
            for (a, b), claim in zip(spans, claims, strict=True):
                if claim.supported or flag:
                    gap = "" if previous_end is None else text[previous_end:a]
                    if pieces:
                        pieces.append("\n" if "\n" in gap else " ")
                    pieces.append(("" if claim.supported else UNVERIFIED) + text[a:b])
                    shown_claims.append(claim)
                previous_end = b
        dropped = len(checked) > len(substantive)
        few = len(substantive) < max(MIN_SUPPORTED, self.settings.quote_below * len(checked))
        quotes = self._quotes(answer.query, verifier, shown_claims) if dropped and few else []
        if not substantive and not quotes:  # never an empty answer
            quotes = self._quotes(answer.query, verifier, fallback=True)
        body = "".join(pieces)
        if quotes:
            lines = [f'"{q.text}" [{q.source}]' for q in quotes]
            if flag and not substantive:
                lines += [UNVERIFIED + c.text for c in claims if not c.supported]
            block = QUOTE_LABEL + "\n" + "\n".join(lines)
            body = f"{body}\n\n{block}" if body else block
        if not body:
            # nothing supported and nothing quotable (every candidate sentence was an order to
            # the machine): say the documents hold no answer rather than show nothing
            body = self._abstention(passages)
            answer.abstained = True
        answer.answer = body
        answer.mode = "quoted" if not shown_claims else "generated"
        answer.claims = [dict(c.as_json(), shown=c in shown_claims) for c in claims]
        if not shown_claims:
            answer.claims = []
        answer.claims += [dict(q.as_json(), shown=True) for q in quotes]
        answer.sources = self._checked_sources(answer, passages, verifier, shown_claims + quotes)

    def _quotes(
        self,
        query: str,
        verifier: Verifier,
        said: Sequence[Claim] = (),
        *,
        fallback: bool = False,
    ) -> list[Claim]:
        """The passage sentences or table lines that best answer ``query``, verbatim: each
        said once, none already said by ``said`` (the shown sentences' spans), and only those
        that state something (a sentence, or a table row with a label and amounts; not a
        heading such as "NOTE 9 — DEBT" or a page footer "Apple Inc. | Q3 2023 Form 10-Q |
        17"). ``fallback``: the best segment when none qualifies."""
        pool = sorted(
            verifier.best_segments(query, limit=QUOTE_POOL),
            key=lambda s: (
                -(s.score + (QUOTE_FIGURE_BONUS if _states_amounts(s.segment.text) else 0))
            ),
        )
        taken = {(c.source, c.start, c.end) for c in said}
        detector = self._detector()
        chosen: list[Claim] = []
        seen: set[str] = set()
        for scored in pool:
            if chosen and scored.score < pool[0].score - QUOTE_MARGIN:
                break
            segment = scored.segment
            quotable = quotable_text(segment.text, detector)
            if quotable is None:
                continue
            text = quotable
            key = text.lower()
            if (
                key in seen
                or not _informative(text)
                or (
                    any(
                        n == segment.number
                        and a is not None
                        and b is not None
                        and a <= segment.start
                        and segment.end <= b
                        for n, a, b in taken
                    )
                )
            ):
                continue
            seen.add(key)
            chosen.append(
                Claim(text, True, segment.number, segment.start, segment.end, reason="quoted")
            )
            if len(chosen) == MAX_QUOTES:
                break
        if not chosen and pool and fallback:
            for scored in pool:
                segment = scored.segment
                quotable = quotable_text(segment.text, detector)
                if quotable is not None:
                    chosen.append(
                        Claim(
                            quotable,
                            True,
                            segment.number,
                            segment.start,
                            segment.end,
                            reason="quoted",
                        )
                    )
                    break
        return chosen

    def _checked_sources(
        self,
        answer: Answer,
        passages: Sequence[Passage],
        verifier: Verifier,
        shown: Sequence[Claim],
    ) -> list[Source]:
        """The passages the shown sentences rest on (or cite, when flagged), each with the
        spans that support them; passage numbers stay those of the citation markers."""
        by_number = {p.number: p for p in passages}
        spans: dict[int, list[list[int]]] = {}
        for claim in shown:
            numbers = (
                [claim.source]
                if claim.source is not None
                else [n for n in cited_numbers(claim.text) if n in by_number]
            )
            for n in numbers:
                found = spans.setdefault(n, [])
                span = [claim.start, claim.end]
                if claim.supported and None not in span and span not in found:
                    found.append([int(claim.start or 0), int(claim.end or 0)])
        if not spans:
            return answer.sources
        fallback = verifier.spans_for(answer.query)
        return [
            Source.of(by_number[n], sorted(v) or fallback.get(n, []))
            for n, v in spans.items()
            if n in by_number
        ]

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


def _states_amounts(text: str) -> bool:
    return any(f.kind in ("amount", "percent") for f in extract_figures(text))


_WORDS = re.compile(r"[^\W\d_]{2,}")


def _informative(text: str) -> bool:
    """A sentence of six words or more, or a table row with a label of two words or more and
    at least two figures (not a heading, and not a footer with a page number and a year)."""
    if len(text.split()) >= 6 and text[-1] in ".!?" and len(_WORDS.findall(text)) >= 5:
        return True
    values = [
        f
        for f in extract_figures(text)
        if f.kind in ("amount", "percent") or (f.kind == "number" and abs(f.value or 0) >= 100)
    ]  # small bare numbers are page and note numbers
    return len(values) >= 2 and len(_WORDS.findall(text)) >= 2


class _Checks:
    """Claim checks off the answer's critical path: one worker thread per answer runs the
    verifier (the embedding model releases the GIL, as llama.cpp does while decoding), so a
    finished sentence is checked while the model writes the next one and only the last
    sentence's check is waited for. The verifier is used by the worker alone until ``wait``
    returns. ``waited_s`` is the time the answer waited for checks (what verification adds
    to it), ``work_s`` the worker's time."""

    def __init__(self, verifier: Verifier) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._verifier = verifier
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="claim-check")
        self._pending: list[tuple[str, Future[Claim]]] = []
        self._other: list[Future[Any]] = []
        self._submitted: set[str] = set()
        self.waited_s = 0.0
        self.work_s = 0.0

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.work_s += time.perf_counter() - t0

        return run

    def prefetch(self, question: str) -> None:
        self._other.append(self._pool.submit(self._timed(self._verifier.evidence), question))

    def submit(self, sentence: str) -> None:
        if sentence not in self._submitted:
            self._submitted.add(sentence)
            future = self._pool.submit(self._timed(self._verifier.verify), sentence)
            self._pending.append((sentence, future))

    def finished(self, *, wait: bool) -> Iterator[tuple[str, Claim]]:
        """Checked sentences in the order written: those done (all, waiting, with ``wait``)."""
        while self._pending and (wait or self._pending[0][1].done()):
            sentence, future = self._pending.pop(0)
            with self.on_critical_path():
                claim = future.result()
            yield sentence, claim

    def wait(self) -> None:
        for future in self._other:
            future.result()
        self._other.clear()

    @contextmanager
    def on_critical_path(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.waited_s += time.perf_counter() - t0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _one_thread(embed: Callable[[list[str]], list[list[float]]]) -> Embed:
    """``embed`` run with one intra-op thread in the calling thread: the verifier embeds a few
    short texts at a time (``intra_op_threads``)."""

    def single(texts: list[str]) -> list[list[float]]:
        with intra_op_threads(1):
            return embed(texts)

    return single


def ask_events(
    answerer: Answerer,
    conversations: ConversationStore | None,
    question: str,
    *,
    user: str,
    conversation: str | None = None,
    where: Mapping[str, Sequence[str]] | None = None,
    ticket: Ticket | None = None,
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
    for event in answerer.stream(question, history=history, where=where, ticket=ticket):
        if event["type"] != "answer":
            yield event
            continue
        answer = event["answer"].as_json()
        message = None
        if conversations is not None and conversation is not None:
            message = conversations.add(user, conversation, answer)
        yield {"type": "answer", "answer": answer, "conversation": conversation, "message": message}
