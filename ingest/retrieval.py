"""Query-side retrieval: turn a question into store queries and rank the chunks that come back.

Two stages:

1. **Candidates.** The dense and the BM25 sparse query go to the store in one request, fused
   there by reciprocal rank fusion under the caller's payload filter (or one of them alone, by
   ``mode``). The store is asked for ``CANDIDATES`` chunks, not ``k``: a deeper fused list is
   better ordered (each side's prefetch is deeper too) and shows enough of each document to
   judge it. The sparse query also carries the other spellings of the periods the question
   names ("first quarter" and "Q1"), see ``expand_query``.
2. **Documents, then chunks.** Questions name the document they are about ("Acme's Q3 2023
   report", "the latest protocol") far more often than its chunks repeat it, and the chunks of
   one document read much like those of its other editions. Each candidate document is scored
   on its identity: the identity line every chunk carries (see ``ingest.identity``) and the
   words of its path. Every question word found there counts by how few candidate documents
   hold it (inverse document frequency) and by how much it is a name rather than a word of
   the texts (see ``document_scores``). When the question asks for the latest or most recent
   document, the newest of the best-named documents (by the latest date in its identity) gains
   too. A chunk's final score is its place in the fused list, ``RANK_K / (RANK_K + rank)``,
   plus its document's score, which counts a little less for each further chunk of the same
   document, so the top ``k`` leans on the best-named document without shutting out the rest.

3. **Table rows beside the text.** Chunks of table rows (payload ``kind`` "table", see
   ``ingest.tables``) hold the figures questions ask for, but they rank below the prose that
   talks about the same line items: a row of figures under its headers reads, to the dense
   model and to BM25 alike, less like a question than a sentence does. Measured on the 10-Q
   filings, the chunk holding a gold answer's figure sat at rank 10 to 100 far more often
   than in the top 5, and among the table rows the best ranked were often rows of the right
   table but the wrong line ("Net sales by reportable segment: Americas" for a question on
   the Services segment): the table's caption and column headers, which every row of it
   repeats, match the question as well as the right row does. So a second store query,
   under the same filter and restricted to table chunks, fetches rows, re-ranked by
   document as above; then the best ``POOL`` of each list compete for the places after the
   main list's best chunk (which keeps the first place), each scored by its re-ranked score
   plus ``LABEL_WEIGHT`` times how well one of its row labels (the text before a row's first
   figure, see ``label_match``) names what the question asks for. Prose and rows thus take
   places by merit, not by a quota. The main list is the text among the candidates: the
   rows that the first query found compete through the second one, by their labels, and
   the text keeps the order it had before tables were indexed (on the 10-Q filings, with
   the row chunks in the main list too, the prose questions stayed one below tables off).
   A question that asks for reasons ("why", "what drove", "which factors", see
   ``asks_for_reasons``) wants the narrative that gives them: it skips the table query and
   keeps the main list. Where no table was indexed the second query finds nothing and the
   top ``k`` is the main list's.

A question that names no document leaves the store's order as it is. The re-ranking is the
same in every mode (it reads words of identities, whichever index found the chunks) and reads
only payloads the store returns anyway; the table rows cost one further store request with
the same vectors.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from appliance.core.protocols import Embedder, Hit, SearchMode, SparseEncoder, VectorStore
from ingest.identity import file_name_terms

CANDIDATES = 100
"""Chunks fetched from the store for re-ranking."""
RANK_K = 60
"""Smoothing of a chunk's fused rank, as in reciprocal rank fusion."""
IDENTITY_WEIGHT = 0.5
"""Weight of a document's identity match (a sum of word weights, about 1 to 3 for a question
that names organisation and period) against 1.0 for the top chunk of the fused list."""
RECENCY_WEIGHT = 0.5
"""Bonus of the newest best-named document when the question asks for the latest one; the
next newest gets half of it, and so on."""
REPEAT_DECAY = 0.8
"""A document's second chunk gets this share of its document score, the third its square..."""
TIE_MARGIN = 0.1
"""Documents whose identity match is this close to the best count as equally well named."""
POOL = 20
"""Places of the main list and of the table rows' list that compete for the top ``k`` after
the first (at least ``k`` of each)."""
LABEL_WEIGHT = 0.5
"""Weight of a chunk's best row-label match (0 to 1, see ``label_match``) against 1.0 for the
top chunk of a fused list; on the 10-Q filings 0.3 to 0.5 did best, 1.0 let rows of a
matching label but the wrong document crowd out the rest."""
TABLE_CANDIDATES = 30
"""Table rows fetched by the second query. Re-ranking encodes every candidate's text for
BM25 terms, so the rows' list is kept short; on the 10-Q filings 20 to 100 rows found the
same evidence."""
TABLE_KIND = "table"
TEXT_KIND = "text"
"""Payload ``kind`` of a chunk: rows of a table, or any other text."""

_ORDINALS = {
    "first": 1,
    "1st": 1,
    "second": 2,
    "2nd": 2,
    "third": 3,
    "3rd": 3,
    "fourth": 4,
    "4th": 4,
}
_QUARTER_WORDS = re.compile(r"\b(first|1st|second|2nd|third|3rd|fourth|4th)\s+quarter\b", re.I)
_QUARTER_CODE = re.compile(r"\bq([1-4])\b", re.I)
_HALF_WORDS = re.compile(r"\b(first|1st|second|2nd)\s+half\b", re.I)
_HALF_CODE = re.compile(r"\bh([12])\b", re.I)
_FISCAL_CODE = re.compile(r"\bfy\s?'?(\d{2}|\d{4})\b", re.I)
_RECENT = re.compile(
    r"\b(latest|newest|most\s+recent(ly)?|most\s+current|last\s+(filed|published))\b", re.I
)
_REASONS = re.compile(
    r"\b(why|reasons?|caus(?:e|es|ed)|drivers?|driven|factors?|explain(?:s|ed)?|explanation)\b",
    re.I,
)
_WORDS_OF = {1: "first", 2: "second", 3: "third", 4: "fourth"}

_MONTH_NUMBER = {
    m: i
    for i, names in enumerate(
        (
            ("jan", "january"),
            ("feb", "february"),
            ("mar", "march"),
            ("apr", "april"),
            ("may",),
            ("jun", "june"),
            ("jul", "july"),
            ("aug", "august"),
            ("sep", "sept", "september"),
            ("oct", "october"),
            ("nov", "november"),
            ("dec", "december"),
        ),
        start=1,
    )
    for m in names
}
_MONTH = (
    r"(jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|"
    r"sept?(?:ember)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
)
_MONTH_DAY_YEAR = re.compile(rf"\b{_MONTH}\.?\s+(\d{{1,2}}),?\s+(\d{{4}})\b", re.I)
_DAY_MONTH_YEAR = re.compile(rf"\b(\d{{1,2}})\s+{_MONTH}\.?,?\s+(\d{{4}})\b", re.I)
_MONTH_YEAR = re.compile(rf"\b{_MONTH}\.?,?\s+(\d{{4}})\b", re.I)
_ISO_DATE = re.compile(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b")
_SLASH_DATE = re.compile(r"\b(\d{1,2})/(\d{1,2})/(\d{4})\b")
_QUARTER_YEAR = re.compile(r"\bq([1-4])\s*(?:fy\s*)?(\d{4})\b|\b(\d{4})\s*q([1-4])\b", re.I)


def expand_query(query: str) -> str:
    """The question with the other spellings of the periods it names appended, for lexical
    matching: "first quarter" and "Q1", "second half" and "H2", "FY23" and "fiscal 2023"."""
    extra: list[str] = []
    for m in _QUARTER_WORDS.finditer(query):
        extra.append(f"Q{_ORDINALS[m.group(1).lower()]}")
    for m in _QUARTER_CODE.finditer(query):
        extra.append(f"{_WORDS_OF[int(m.group(1))]} quarter")
    for m in _HALF_WORDS.finditer(query):
        extra.append(f"H{_ORDINALS[m.group(1).lower()]}")
    for m in _HALF_CODE.finditer(query):
        extra.append(f"{_WORDS_OF[int(m.group(1))]} half")
    for m in _FISCAL_CODE.finditer(query):
        year = m.group(1)
        extra.append(f"fiscal {'20' + year if len(year) == 2 else year}")
    return f"{query} {' '.join(dict.fromkeys(extra))}" if extra else query


def asks_for_latest(query: str) -> bool:
    return bool(_RECENT.search(query))


def asks_for_reasons(query: str) -> bool:
    """Whether the question asks why, or for the drivers, causes or factors of something:
    its answer is narrative, which table rows would crowd out."""
    return bool(_REASONS.search(query))


def _date(year: int, month: int, day: int) -> dt.date | None:
    try:
        return dt.date(year, month, day)
    except ValueError:
        return None


def latest_date(text: str) -> dt.date | None:
    """The latest full date written in ``text`` ("July 1, 2023", "1 July 2023", "2023-07-01",
    "7/1/2023"); failing that, the latest month ("July 2023") or quarter ("Q3 2023")."""
    full: list[dt.date | None] = []
    for month, day, year in _MONTH_DAY_YEAR.findall(text):
        full.append(_date(int(year), _MONTH_NUMBER[month.lower()], int(day)))
    for day, month, year in _DAY_MONTH_YEAR.findall(text):
        full.append(_date(int(year), _MONTH_NUMBER[month.lower()], int(day)))
    for year, month, day in _ISO_DATE.findall(text):
        full.append(_date(int(year), int(month), int(day)))
    for a, b, year in _SLASH_DATE.findall(text):
        # Month first as written in the US, unless the first number cannot be a month.
        first, second = int(a), int(b)
        full.append(
            _date(int(year), first, second) if first <= 12 else _date(int(year), second, first)
        )
    if not any(full):
        for month, year in _MONTH_YEAR.findall(text):
            full.append(_date(int(year), _MONTH_NUMBER[month.lower()], 1))
        for q1, y1, y2, q2 in _QUARTER_YEAR.findall(text):
            quarter, year = (int(q1), int(y1)) if q1 else (int(q2), int(y2))
            full.append(_date(year, 3 * quarter, 1))
    return max((d for d in full if d is not None), default=None)


def _identity_text(payload: Mapping[str, object]) -> str:
    path = str(payload.get("path") or "")
    return f"{payload.get('identity') or ''}\n{file_name_terms(path)}"


def document_scores(
    query: str,
    identities: Mapping[str, str],
    texts: Mapping[str, Sequence[str]],
    sparse: SparseEncoder,
) -> dict[str, float]:
    """Per document key, how well the question names it: ``IDENTITY_WEIGHT`` times its
    identity match, plus the recency bonus when the question asks for the latest document.

    ``identities`` holds each candidate document's identity text, ``texts`` the texts of its
    candidate chunks. The match is the sum of the weights of the question's words (BM25 terms)
    that the identity holds. A word weighs its inverse document frequency among the candidates'
    identities, times the square of the share of the documents using it that name it: the
    documents that hold it in their identity, against those whose chunks use it without it.
    A word that names an organisation ("Northwind") is used by its documents alone; a year
    that the chunks of other editions use in comparisons weighs less; "notes" or "state" in
    one identity, used by every document's text, weighs next to nothing.
    """
    docs = list(identities)
    if not docs:
        return {}
    terms = set(sparse.embed_query(expand_query(query)).indices)
    held = {d: set(sparse.embed_document(identities[d]).indices) & terms for d in docs}
    used = {
        d: set().union(*(sparse.embed_document(t).indices for t in texts.get(d, ()))) & terms
        for d in docs
    }
    n = len(docs)
    weight: dict[int, float] = {}
    for term in terms:
        named = sum(term in held[d] for d in docs)
        if not named:
            continue
        idf = math.log(1 + (n - named + 0.5) / (named + 0.5))
        # Documents whose chunks use the word although their identity lacks it.
        used_elsewhere = sum(term in used[d] and term not in held[d] for d in docs)
        weight[term] = idf * (named / (named + used_elsewhere)) ** 2
    match = {d: sum(weight[t] for t in held[d]) for d in docs}
    scores = {d: IDENTITY_WEIGHT * match[d] for d in docs}
    if asks_for_latest(query):
        best = max(match.values())
        named_best = [d for d in docs if match[d] >= best - TIE_MARGIN]
        dated = {d: latest_date(identities[d]) for d in named_best}
        order = sorted({day for day in dated.values() if day is not None}, reverse=True)
        for d, day in dated.items():
            if day is not None:
                scores[d] += RECENCY_WEIGHT * 0.5 ** order.index(day)
    return scores


def rerank(query: str, hits: Sequence[Hit], sparse: SparseEncoder, k: int) -> list[Hit]:
    """The top ``k`` of ``hits`` (best first) by fused rank plus document score."""
    identities: dict[str, str] = {}
    texts: dict[str, list[str]] = {}
    for hit in hits:
        key = _document_key(hit)
        identities.setdefault(key, _identity_text(hit.payload))
        texts.setdefault(key, []).append(str(hit.payload.get("text") or ""))
    doc_score = document_scores(query, identities, texts, sparse)
    seen: dict[str, int] = {}
    scored: list[tuple[float, int, Hit]] = []
    for rank, hit in enumerate(hits):
        key = _document_key(hit)
        repeat = seen.get(key, 0)
        seen[key] = repeat + 1
        score = RANK_K / (RANK_K + rank) + doc_score[key] * REPEAT_DECAY**repeat
        scored.append((score, rank, hit))
    scored.sort(key=lambda s: (-s[0], s[1]))
    return [Hit(id=h.id, score=score, payload=h.payload) for score, _rank, h in scored[:k]]


def _document_key(hit: Hit) -> str:
    return str(hit.payload.get("path") or hit.id)


def retrieve(
    store: VectorStore,
    embedder: Embedder,
    sparse: SparseEncoder,
    query: str,
    k: int,
    *,
    mode: SearchMode = "hybrid",
    where: Mapping[str, Sequence[str]] | None = None,
) -> list[Hit]:
    """The top ``k`` chunks for ``query``: the text among the store's best
    ``max(k, CANDIDATES)`` under ``where`` (dense, sparse or both fused, by ``mode``),
    re-ranked by document (``rerank``), merged with the best table rows under ``where``
    (``with_table_rows``) unless the question asks for reasons. Where the candidates are all
    table rows they stand for the text; where the index holds no table rows, the candidates
    are re-ranked as they are. Hit scores are the re-ranked scores, plus the label match of
    the merge after the first place."""
    if k <= 0:
        return []
    dense = embedder.embed_query(query) if mode != "sparse" else None
    lexical = sparse.embed_query(expand_query(query)) if mode != "dense" else None
    hits = store.query(dense, lexical, max(k, CANDIDATES), mode=mode, where=where)
    # The text is ranked on its own: the rows compete through their own query, by label.
    text = [h for h in hits if h.payload.get("kind") != TABLE_KIND] or list(hits)
    if asks_for_reasons(query):
        return rerank(query, text, sparse, k)
    only_tables = {**(where or {}), "kind": [TABLE_KIND]}
    rows = store.query(dense, lexical, max(2 * k, TABLE_CANDIDATES), mode=mode, where=only_tables)
    if not rows:
        return rerank(query, hits, sparse, k)
    main = rerank(query, text, sparse, max(k, POOL))
    return with_table_rows(query, main, rerank(query, rows, sparse, max(k, POOL)), sparse, k)


def row_labels(payload: Mapping[str, object]) -> list[str]:
    """The row labels of a table chunk (payload ``kind`` "table"): each line after the
    header's first, up to its first ``|`` (``Net sales by category: Services`` of
    ``Net sales by category: Services | July 1, 2023: 21,213 | ...``). None for other text."""
    if payload.get("kind") != TABLE_KIND:
        return []
    lines = str(payload.get("text") or "").split("\n")[1:]
    return [line.split("|", 1)[0].strip() for line in lines if "|" in line]


def label_match(query: str, hits: Sequence[Hit], sparse: SparseEncoder) -> dict[str, float]:
    """Per hit, how well its best row label names what ``query`` asks for, from 0 to 1: the
    weights of the question's words (BM25 terms) that the label holds, over the weights of
    all the question's words that any label among ``hits`` holds. A word weighs its inverse
    frequency among those labels: "Services" in one row label of many counts, "net" or
    "sales" in most of them hardly. Chunks that are not table rows score 0.

    Only labels count, not the caption or column headers: every row of a table repeats those,
    so they cannot tell its rows apart (the fused rank has already weighed them)."""
    terms = set(sparse.embed_query(expand_query(query)).indices)
    encoded: dict[str, frozenset[int]] = {}
    labels: dict[str, list[frozenset[int]]] = {}
    for hit in hits:
        per_label: list[frozenset[int]] = []
        for label in row_labels(hit.payload):
            if label not in encoded:
                encoded[label] = frozenset(sparse.embed_document(label).indices) & terms
            per_label.append(encoded[label])
        labels[hit.id] = per_label
    every = [named for per_hit in labels.values() for named in per_hit]
    n = len(every)
    frequency: dict[int, int] = {}
    for named in every:
        for term in named:
            frequency[term] = frequency.get(term, 0) + 1
    weight = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in frequency.items()}
    total = sum(weight.values())
    if not total:
        return dict.fromkeys(labels, 0.0)
    return {
        key: max((sum(weight[t] for t in named) for named in per_hit), default=0.0) / total
        for key, per_hit in labels.items()
    }


def with_table_rows(
    query: str, main: Sequence[Hit], rows: Sequence[Hit], sparse: SparseEncoder, k: int
) -> list[Hit]:
    """The top ``k`` of two re-ranked lists: the first of ``main``, then the rest of both
    (each chunk once, at its better score) by score plus ``LABEL_WEIGHT`` times its
    ``label_match``, best first."""
    if not main:
        return list(rows[:k])
    pool: dict[str, Hit] = {}
    for hit in (*main, *rows):
        if hit.id not in pool or hit.score > pool[hit.id].score:
            pool[hit.id] = hit
    match = label_match(query, list(pool.values()), sparse)
    first = main[0]
    rest = sorted(
        (
            Hit(id=h.id, score=h.score + LABEL_WEIGHT * match[h.id], payload=h.payload)
            for h in pool.values()
            if h.id != first.id
        ),
        key=lambda h: -h.score,
    )
    return [first, *rest][: max(k, 0)]


class SearchIndex(Protocol):
    """What a search reads: an indexer's store and its two query encoders."""

    @property
    def store(self) -> VectorStore: ...

    @property
    def embedder(self) -> Embedder: ...

    @property
    def sparse(self) -> SparseEncoder: ...


def search(
    index: SearchIndex,
    query: str,
    k: int = 5,
    *,
    mode: SearchMode = "hybrid",
    where: Mapping[str, Sequence[str]] | None = None,
) -> list[dict[str, Any]]:
    """``retrieve`` on an index, each hit as the JSON the API and the CLI return."""
    hits = retrieve(index.store, index.embedder, index.sparse, query, k, mode=mode, where=where)
    return [
        {
            "path": h.payload.get("path"),
            "page": h.payload.get("page"),
            "heading": h.payload.get("heading"),
            "score": round(h.score, 6),
            "text": h.payload.get("text", ""),
            "start": h.payload.get("start"),
            "end": h.payload.get("end"),
            "chunk_index": h.payload.get("chunk_index"),
            "ocr_confidence": h.payload.get("ocr_confidence"),
        }
        for h in hits
    ]
