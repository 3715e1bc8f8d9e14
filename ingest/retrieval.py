"""Query-side retrieval: turn a question into store queries and rank the chunks that come back.

Two stages:

1. **Candidates.** The dense and the BM25 sparse query go to the store in one request, fused
   there by reciprocal rank fusion under the caller's payload filter (or one of them alone, by
   ``mode``). The store is asked for ``CANDIDATES`` chunks, not ``k``: a wider fused list is
   better ordered (each side's prefetch is deeper) and holds enough of each document to judge it.
2. **Documents, then chunks.** Questions name the document they are about ("Acme's Q3 2023
   report", "the latest protocol") far more often than its chunks do, and the chunks of one
   document read alike across its editions. Each candidate document is therefore scored on
   its identity (the identity line every chunk carries, see ``ingest.identity``, and the words
   of its path): the share of the question's identity words it holds, each weighted by how few
   candidate documents hold it. When the question asks for the latest or most recent one, the
   newest of the best-matching documents (by the latest date in its identity) gains too. A
   chunk's final score is its rank in the fused list (``RANK_K / (RANK_K + rank)``) plus its
   document's score, which counts a little less for each further chunk of the same document,
   so the top ``k`` leans on the best document without shutting out the runner-up.

Questions that name no document leave every document score equal, and the store's order stands.
Everything here reads payloads the store returns anyway (``path``, ``identity``); it costs no
further store request and no embedding.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping, Sequence

from appliance.protocols import Embedder, Hit, SearchMode, SparseEncoder, VectorStore
from ingest.identity import file_name_terms

CANDIDATES = 100
"""Chunks fetched from the store for re-ranking."""
RANK_K = 60
"""Smoothing of a chunk's fused rank, as in reciprocal rank fusion."""
IDENTITY_WEIGHT = 1.0
"""Score of a document that holds every identity word of the question, against 1.0 for the
top chunk of the fused list."""
RECENCY_WEIGHT = 0.5
"""Score of the newest best-matching document when the question asks for the latest one."""
REPEAT_DECAY = 0.8
"""The document score of a document's second chunk is this share of its first's, and so on."""
TIE_MARGIN = 0.1
SPEC = "nm2"
"""Documents whose identity match is this close to the best count as equally well named."""

_ORDINALS = {"first": 1, "1st": 1, "second": 2, "2nd": 2, "third": 3, "3rd": 3, "fourth": 4, "4th": 4}
_QUARTER_WORDS = re.compile(r"\b(first|1st|second|2nd|third|3rd|fourth|4th)\s+quarter\b", re.I)
_QUARTER_CODE = re.compile(r"\bq([1-4])\b", re.I)
_HALF_WORDS = re.compile(r"\b(first|1st|second|2nd)\s+half\b", re.I)
_HALF_CODE = re.compile(r"\bh([12])\b", re.I)
_FISCAL_CODE = re.compile(r"\bfy\s?'?(\d{2}|\d{4})\b", re.I)
_RECENT = re.compile(r"\b(latest|newest|most\s+recent(ly)?|most\s+current|last\s+(filed|published))\b", re.I)
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
_MONTH = r"(jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sept?(?:ember)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
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
        full.append(_date(int(year), first, second) if first <= 12 else _date(int(year), second, first))
    found = [d for d in full if d is not None]
    if not found:
        for month, year in _MONTH_YEAR.findall(text):
            found.append(dt.date(int(year), _MONTH_NUMBER[month.lower()], 1))
        for q1, y1, y2, q2 in _QUARTER_YEAR.findall(text):
            quarter, year = (int(q1), int(y1)) if q1 else (int(q2), int(y2))
            found.append(dt.date(year, 3 * quarter, 1))
    return max(found, default=None)


def _identity_text(payload: Mapping[str, object]) -> str:
    path = str(payload.get("path") or "")
    return f"{payload.get('identity') or ''}\n{file_name_terms(path)}"


def document_scores(
    query: str,
    identities: Mapping[str, str],
    texts: Mapping[str, Sequence[str]],
    sparse: SparseEncoder,
) -> dict[str, float]:
    """Per document key, how well the question names it: the identity match in [0, 1] times
    ``IDENTITY_WEIGHT``, plus the recency bonus when the question asks for the latest one.

    ``identities`` holds each candidate document's identity text, ``texts`` the texts of its
    candidate chunks. A question word counts towards a document's identity by how few
    candidate documents hold it there (inverse document frequency) and by how specific it is
    to identities: a word that the candidates' chunk texts use in documents whose identity
    lacks it ("notes", "state") names nothing, however rare it is among identities.
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
        # The share of the other documents whose chunks use the word all the same.
        used_elsewhere = sum(term in used[d] and term not in held[d] for d in docs)
        mentioned = named + used_elsewhere
        if SPEC == "u":
            weight[term] = idf * (1 - used_elsewhere / (n - named)) if named < n else idf
        elif SPEC == "nm":
            weight[term] = idf * named / mentioned
        elif SPEC == "nm2":
            weight[term] = idf * (named / mentioned) ** 2
        elif SPEC == "u2":
            weight[term] = idf * (1 - used_elsewhere / (n - named) / 2) if named < n else idf
        else:
            weight[term] = idf
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
    """The top ``k`` chunks for ``query``."""
    if k <= 0:
        return []
    dense = embedder.embed_query(query) if mode != "sparse" else None
    lexical = sparse.embed_query(expand_query(query)) if mode != "dense" else None
    hits = store.query(dense, lexical, max(k, CANDIDATES), mode=mode, where=where)
    return rerank(query, hits, sparse, k)
