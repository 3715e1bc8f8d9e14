"""The claim verifier: is each sentence of an answer stated by the passage it cites?

    answer ─► sentences (citation markers stay with their sentence)
    passages ─► segments (sentences; table rows as lines)
    sentence ─► candidate passages: the ones it cites, or all when it cites none
             ─► figures: every amount, percentage, date, count and identifier of the sentence
                must be stated by the passage (``appliance.core.figures``); one missing: unsupported
             ─► wording: the best segment by ``w * lexical + (1 - w) * embedding``, where
                lexical is the share of the sentence's content words found in that segment and
                its neighbours and embedding is the cosine similarity of sentence and segment;
                below the calibrated threshold: unsupported
             ─► negation: a sentence that negates what its best segment affirms (or the other
                way round) is unsupported
             ─► a Claim: supported or not, the passage, the character span, the reason

A sentence is checked only against the passages it cites: when it cites [2] but only [1]
states it, it is unsupported (the reason names [1]); shown with the wrong citation, it would
send the reader to a passage that does not say it. The threshold and weight are calibrated on
``tests/data/claims.jsonl`` by ``benchmarks/claim_calibration.py``.

Fast on purpose: regular expressions and set arithmetic, plus the embedding model that is
already loaded for retrieval, called on the sentence and a few candidate segments (lexical
prefilter), each text embedded once per answer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from appliance.core.figures import Figure, FigureMatch, extract_figures, find_figure
from appliance.core.settings import LEXICAL_WEIGHT, SUPPORT_THRESHOLD

Embed = Callable[[list[str]], list[list[float]]]


def _wordset(words: str) -> frozenset[str]:
    return frozenset(words.split())


FIGURE_ANCHOR = 0.1
"""Added to the support of a segment that states the sentence's figures itself: a table row
("Total revenue 52,857 49,360") says little in words, and its figures are stronger evidence
than any word."""
CONTRADICTION_MARGIN = 0.1
"""A segment that agrees with the sentence is preferred over one that scores up to this much
higher but contradicts it (a passage may negate one thing and state another)."""
CANDIDATE_SEGMENTS = 3
"""Segments per passage whose embedding is compared with a sentence (best lexical first)."""
LIKELY_PASSAGES = 2
"""Passages a sentence citing nothing is compared with (by word overlap, among those that
state its figures)."""
EVIDENCE_LEXICAL_WEIGHT = 0.4
"""Weight of the question's words and figures against embedding similarity when choosing the
segments that answer a question (as ``LEXICAL_WEIGHT`` for a claim)."""
SPAN_SHARE = 0.6
"""A passage's second highlighted span scores at least this share of its best one."""
QUESTION_FIGURE_WEIGHT = 2.0
"""A date, period or figure of a question weighs as much as two of its rarest words: it says
which row or sentence answers ("... for the quarter ended March 31, 2023")."""

_CITATION = re.compile(r"\s*\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")
_WORD = re.compile(r"[^\W_]+(?:[.,'\u2019][^\W_]+)*", re.UNICODE)
_ABBREVIATIONS = _wordset(
    "inc ltd co corp no nos vs etc e.g i.e u.s u.k mr mrs ms dr st jr sr fig approx dept est "
    "jan feb mar apr jun jul aug sep sept oct nov dec"
)
# A sentence ends at . ! or ? (with closing quotes, brackets and citation markers) before
# whitespace, or at a line break.
_END = re.compile(r"[.!?]+[\"'\u2019\u201d)\]]*(?:\s*\[\d{1,3}(?:\s*,\s*\d{1,3})*\])*(?=\s)|\n")
_NEGATION = re.compile(
    r"\b(?:not|no|never|none|neither|nor|cannot|without|nobody|nothing)\b|n[\u2019']t\b",
    re.IGNORECASE,
)
_STOPWORDS = _wordset(
    """a an the and or but if then than of to in on at by for with from as into over under about
    is are was were be been being am do does did has have had having this that these those it its
    it's they them their there here which who whom whose what when where why how all any each
    both such so also only own same very can could will would shall should may might must per
    via upon our we us you your he she his her i me my mine one ones company's during while
    according passage document documents context based stated states state says said
    reported report reports million millions billion billions thousand thousands
    percent"""
)


@dataclass(frozen=True)
class Claim:
    """One sentence of an answer and whether the cited passages state it."""

    text: str
    supported: bool
    source: int | None = None
    start: int | None = None
    end: int | None = None
    reason: str = ""
    score: float | None = field(default=None, compare=False)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("score")
        return data


class PassageLike(Protocol):
    @property
    def number(self) -> int: ...

    @property
    def text(self) -> str: ...


@dataclass(frozen=True)
class Segment:
    """A sentence or table line of a passage, by character offsets into the passage text."""

    number: int
    index: int
    start: int
    end: int
    text: str
    table: bool = False
    context: str = ""
    """For a table line: the prose above it (the table's caption or header), which says what
    its figures are; compared with a sentence together with the line."""

    @property
    def compared(self) -> str:
        return f"{self.context} {self.text}" if self.context else self.text


def stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s", "ly"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def content_words(text: str) -> set[str]:
    """Lower-cased, stemmed words that carry content (no stopwords; numbers without
    separators)."""
    out = set()
    for raw in _WORD.findall(_CITATION.sub(" ", text).lower()):
        word = raw.replace(",", "").replace("\u2019", "'")
        if word.endswith("'s"):
            word = word[:-2]
        if word in _STOPWORDS or (len(word) < 3 and not word[:1].isdigit()):
            continue
        out.add(stem(word))
    return out


_LIST_NUMBER = re.compile(r"(?:^|[.!?:]\s+|\n)\s*(?:\d{1,2}|[a-zA-Z]|[ivxIVX]{1,4})\.$")


def _ends_sentence(text: str, match: re.Match[str]) -> bool:
    if match.group(0) == "\n":
        return True
    if _LIST_NUMBER.search(text, 0, match.end()):
        return False  # a list item's number ("1. Higher costs") starts a sentence, not one
    before = re.search(r"([\w.]+)\.$", text[: match.start() + 1])
    if before and match.group(0).startswith(".") and before.group(1).lower() in _ABBREVIATIONS:
        return False
    # an initial ("J. Smith") does not end a sentence
    return not (before and re.fullmatch(r"[A-Za-z]", before.group(1)))


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Sentences as ``(start, end)`` offsets, trimmed."""
    spans: list[tuple[int, int]] = []
    start = 0
    for match in _END.finditer(text):
        if _ends_sentence(text, match):
            spans.append((start, match.end()))
            start = match.end()
    spans.append((start, len(text)))
    trimmed = []
    for s, e in spans:
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if s < e and re.search(r"\w", text[s:e]):
            trimmed.append((s, e))
    return trimmed


def finished_sentences(text: str) -> list[tuple[int, int]]:
    """The sentences of a stream still being written that are complete: the last one is not,
    nor one whose citation marker may still come ("2023. " before "[1]")."""
    spans = sentence_spans(text)[:-1]
    while spans:
        rest = text[spans[-1][1] :].lstrip()
        if rest and not rest.startswith("["):
            break
        spans.pop()
    return spans


_CELL = re.compile(r"[$(]*-?\d[\d,.]*%?\)?|[—\u2013-]+|\$")


_CELL_IN_LINE = re.compile(r"(?<!\S)[$(]*-?\d[\d,.]*%?\)?(?!\S)")


def _is_table_line(line: str) -> bool:
    """A row of figures: it ends with a number (or a dash for an empty cell), where a wrapped
    line of prose ends with a word."""
    cells = line.split()
    return bool(cells) and len(cells) <= 24 and bool(_CELL.fullmatch(cells[-1]))


def passage_segments(number: int, text: str, *, max_chars: int = 400) -> list[Segment]:
    """A passage as sentences and table lines: prose that runs over line breaks is joined,
    a line that reads like a table row stays a segment of its own; long runs are cut."""
    blocks: list[tuple[int, int]] = []
    pos = 0
    prose_start: int | None = None
    for line in text.splitlines(keepends=True):
        end = pos + len(line)
        if _is_table_line(line) or not line.strip():
            if prose_start is not None:
                blocks.append((prose_start, pos))
                prose_start = None
            if line.strip():
                blocks.append((pos, end))
        elif prose_start is None:
            prose_start = pos
        pos = end
    if prose_start is not None:
        blocks.append((prose_start, len(text)))
    pieces: list[tuple[int, int, bool]] = []
    for b_start, b_end in blocks:
        table = _is_table_line(text[b_start:b_end])
        for s, e in sentence_spans(text[b_start:b_end].replace("\n", " ")):
            s, e = s + b_start, e + b_start
            while e - s > max_chars:
                cut = text.rfind(" ", s + max_chars // 2, s + max_chars)
                cut = cut if cut > s else s + max_chars
                pieces.append((s, cut, table))
                s = cut + 1
            pieces.append((s, e, table))
    segments: list[Segment] = []
    caption = ""
    heading = False  # the previous segment was caption material too: the caption goes on
    for s, e, table in pieces:
        words = " ".join(text[s:e].split())
        if not words:
            continue
        row = table and len(_CELL_IN_LINE.findall(words)) >= 2
        if not row:
            caption = (f"{caption} {words}" if heading else words)[-200:]
        heading = not row
        segments.append(
            Segment(number, len(segments), s, e, text[s:e], table, caption if table else "")
        )
    return segments


def cited_numbers(sentence: str) -> list[int]:
    numbers: list[int] = []
    for match in _CITATION.finditer(sentence):
        for n in re.split(r"\s*,\s*", match.group(1)):
            if int(n) not in numbers:
                numbers.append(int(n))
    return numbers


def strip_citations(sentence: str) -> str:
    text = _CITATION.sub("", sentence)
    return re.sub(r"\s+([.,;:!?])", r"\1", text).strip()


def _without_figures(text: str) -> str:
    """The text with its figures blanked out: they are checked on their own, and their digits
    and month names would count as words."""
    for figure in reversed(extract_figures(text)):
        text = text[: figure.start] + " " + text[figure.end :]
    return text


def is_negated(text: str) -> bool:
    return bool(_NEGATION.search(text))


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    return dot / norm if norm else 0.0


@dataclass
class _Scored:
    segment: Segment
    lexical: float
    similarity: float
    score: float


class Verifier:
    """Checks sentences against one answer's passages. Build one per answer: it caches the
    passages' segments, figures and embeddings."""

    def __init__(
        self,
        passages: Sequence[PassageLike],
        embed: Embed | None,
        *,
        threshold: float = SUPPORT_THRESHOLD,
        lexical_weight: float = LEXICAL_WEIGHT,
        candidates: int = CANDIDATE_SEGMENTS,
    ) -> None:
        self.passages = {p.number: p for p in passages}
        self.threshold = threshold
        self.lexical_weight = lexical_weight if embed is not None else 1.0
        self.candidates = candidates
        self._embed = embed
        self._vectors: dict[str, list[float]] = {}
        self.segments = {n: passage_segments(n, p.text) for n, p in self.passages.items()}
        self._words = {
            n: [content_words(s.text) for s in segs] for n, segs in self.segments.items()
        }
        self._context_words = {
            n: [content_words(s.context) for s in segs] for n, segs in self.segments.items()
        }
        self._figures: dict[int, list[Figure]] = {}
        self._collecting: list[str] | None = None
        self._idf_cache: dict[str, float] | None = None
        self._segment_count = 0
        self._evidence: dict[tuple[str, bool, int], list[_Scored]] = {}
        self.embed_calls = 0

    # --- embeddings, each text once --------------------------------------------------------

    def _embed_all(self, texts: Sequence[str]) -> None:
        if self._collecting is not None:
            self._collecting.extend(texts)
            return
        missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        if missing and self._embed is not None:
            self.embed_calls += 1
            for text, vector in zip(missing, self._embed(missing), strict=True):
                self._vectors[text] = vector

    def _similarity(self, a: str, b: str) -> float:
        if self._embed is None or self._collecting is not None:
            return 0.0
        return _cosine(self._vectors[a], self._vectors[b])

    # --- scoring -----------------------------------------------------------------------------

    def _lexical(
        self, words: set[str], number: int, index: int, figures: Sequence[list[FigureMatch]]
    ) -> float:
        """The share of ``words`` and located ``figures`` in segment ``index``, averaged with
        the share in the segment and its neighbours (a sentence may draw on two adjacent
        passage sentences, a table row on its header)."""
        total = len(words) + len(figures)
        if not total:
            return 0.0
        segments = self.segments[number]
        own, lo, hi = segments[index], max(0, index - 1), min(len(segments), index + 2)
        window = self._words[number][lo:hi]
        near = set().union(*window, self._context_words[number][index])
        in_own = sum(any(own.start <= m.start < own.end for m in f) for f in figures)
        start, end = segments[lo].start, segments[hi - 1].end
        in_near = sum(any(start <= m.start < end for m in f) for f in figures)
        found = len(words & self._words[number][index]) + in_own + len(words & near) + in_near
        return found / (2 * total)

    def _score(
        self,
        text: str,
        numbers: Sequence[int],
        figures: Sequence[list[FigureMatch]] = (),
        cells: Sequence[list[FigureMatch]] = (),
    ) -> list[_Scored]:
        """Segments of passages ``numbers``, best first, for ``text`` (whose figures were
        found at ``figures`` in the one passage given with them)."""
        words = content_words(_without_figures(text))
        shortlist: list[tuple[float, Segment]] = []
        for n in numbers:
            ranked = sorted(
                ((self._lexical(words, n, s.index, figures), s) for s in self.segments.get(n, [])),
                key=lambda r: -r[0],
            )
            shortlist += ranked[: self.candidates]
        if len(numbers) > 1:  # several passages: the best few of them all
            shortlist = sorted(shortlist, key=lambda r: -r[0])[: self.candidates * 2]
        w = self.lexical_weight

        def anchored(seg: Segment) -> float:
            if not figures:
                return 0.0
            return sum(any(seg.start <= m.start < seg.end for m in f) for f in figures) / len(
                figures
            )

        # an embedding only matters where a perfect similarity could reach the threshold:
        # elsewhere words and figures decide alone, and the model is not called
        ceiling = max(
            (w * lex + (1 - w) + FIGURE_ANCHOR * anchored(seg) for lex, seg in shortlist),
            default=0.0,
        )
        compare = ceiling >= self.threshold
        if compare:
            self._embed_all([text] + [s.compared for _lex, s in shortlist])
        scored = []
        for lex, seg in shortlist:
            sim = self._similarity(text, seg.compared) if compare else 0.0
            score = w * lex + (1 - w) * sim + FIGURE_ANCHOR * anchored(seg)
            if seg.table:
                score = max(score, self._row_support(words, seg, cells))
            scored.append(_Scored(seg, lex, sim, score))
        scored.sort(key=lambda s: -s.score)
        return scored

    def _row_support(
        self, words: set[str], row: Segment, cells: Sequence[list[FigureMatch]]
    ) -> float:
        """Support of a table row, which says what it says by its label and its cells: every
        figure of the sentence located in the row (dates and years may sit in the header)
        and the row's label words in the sentence. 0.5 + half the label's share, so a row
        whose whole label the sentence repeats fully supports it, and one whose label it
        does not repeat never does."""
        in_row = [any(row.start <= m.start < row.end for m in c) for c in cells]
        if not in_row or not all(in_row):
            return 0.0
        label = content_words(_without_figures(row.text))
        if not label:
            return 0.0
        return 0.5 + 0.5 * len(label & words) / len(label)

    def _passage_figures(self, number: int) -> list[Figure]:
        if number not in self._figures:
            self._figures[number] = extract_figures(self.passages[number].text)
        return self._figures[number]

    # --- the checks --------------------------------------------------------------------------

    def verify(self, sentence: str) -> Claim:
        """One sentence of the answer, as written (with its citation markers): its texts are
        embedded in one call."""
        return self.verify_all([sentence])[0]

    def verify_all(self, sentences: Sequence[str]) -> list[Claim]:
        """Several sentences, with every text they need embedded in one call: a first pass
        collects the texts (figures and word overlap decide which segments are compared), the
        second decides. Each call to the embedding model costs far more than a few texts more
        (on a busy CPU, a second per call)."""
        self._collecting = []
        for sentence in sentences:
            self._verify(sentence)
        needed, self._collecting = self._collecting, None
        self._embed_all(needed)
        return [self._verify(s) for s in sentences]

    def _verify(self, sentence: str) -> Claim:
        text = strip_citations(sentence)
        shown = sentence.strip()
        words = content_words(text)
        figures = extract_figures(text)
        if not words and not figures:
            return Claim(shown, True, reason="no claim to check")
        cited = [n for n in cited_numbers(sentence) if n in self.passages]
        numbers = cited or self._likely_passages(text, figures)
        best: Claim | None = None
        for n in numbers:
            claim = self._check(shown, text, figures, n)
            if best is None or _better(claim, best):
                best = claim
        assert best is not None
        if not best.supported and cited:
            others = [n for n in sorted(self.passages) if n not in cited]
            for n in others:
                if self._check(shown, text, figures, n).supported:
                    cites = ", ".join(f"[{c}]" for c in cited)
                    best = _replace_reason(best, f"{best.reason}; stated in [{n}], not in {cites}")
                    break
        if not best.supported:
            # the contract: ``source`` names a passage that supports the sentence
            best = Claim(best.text, False, None, None, None, best.reason, best.score)
        return best

    def _likely_passages(self, text: str, figures: Sequence[Figure]) -> list[int]:
        """For a sentence that cites nothing: the passages that state all its figures, at most
        ``LIKELY_PASSAGES`` of them, most word overlap first (the rest would only cost
        embeddings); every passage when none states them all (each then says why not)."""
        words = content_words(_without_figures(text))
        stating = [
            n
            for n in sorted(self.passages)
            if all(
                find_figure(f, self.passages[n].text, figures=self._passage_figures(n))
                for f in figures
            )
        ]
        if not stating:
            return sorted(self.passages)
        overlap = {n: max((len(words & w) for w in self._words[n]), default=0) for n in stating}
        return sorted(stating, key=lambda n: (-overlap[n], n))[:LIKELY_PASSAGES]

    def _check(self, shown: str, text: str, figures: Sequence[Figure], number: int) -> Claim:
        passage = self.passages[number].text
        located: dict[Figure, list[FigureMatch]] = {}
        for figure in figures:
            matches = find_figure(figure, passage, figures=self._passage_figures(number))
            if not matches:
                return Claim(
                    shown,
                    False,
                    number,
                    reason=f"figure {figure.text} not in passage [{number}]",
                    score=-1.0,
                )
            located[figure] = matches
        cells = [m for f, m in located.items() if f.kind in ("amount", "percent", "number")]
        scored = self._score(text, [number], list(located.values()), cells)
        if not scored:
            return Claim(shown, False, number, reason=f"passage [{number}] is empty", score=-1.0)
        # the best segment that does not contradict the sentence, unless a contradicting one
        # fits clearly better (independent of the threshold, so calibration sees one decision)
        top = scored[0]
        agreeing = [s for s in scored if not _contradiction(text, s.segment.text)]
        if agreeing and agreeing[0].score >= top.score - CONTRADICTION_MARGIN:
            top = agreeing[0]
        seg = top.segment
        contradiction = _contradiction(text, seg.text)
        if contradiction:
            return Claim(
                shown, False, number, reason=f"{contradiction} (passage [{number}])", score=-1.0
            )
        if top.score < self.threshold:
            return Claim(
                shown,
                False,
                number,
                reason=f"low support {top.score:.2f} < {self.threshold:.2f} in passage [{number}]",
                score=top.score,
            )
        start, end = seg.start, seg.end
        for matches in located.values():
            # the occurrence nearest the wording's span joins it
            near = min(matches, key=lambda m: min(abs(m.start - seg.start), abs(m.end - seg.end)))
            start, end = min(start, near.start), max(end, near.end)
        return Claim(
            shown, True, number, start, end, reason=f"supported {top.score:.2f}", score=top.score
        )

    # --- evidence for a question ------------------------------------------------------------

    def _idf(self) -> dict[str, float]:
        """Inverse segment frequency of each word over this answer's passages: a word every
        segment repeats ("Apple", "net") says little about which one answers a question."""
        if self._idf_cache is None:
            df: dict[str, int] = {}
            total = 0
            for n, segs in self.segments.items():
                for i in range(len(segs)):
                    total += 1
                    for word in self._words[n][i] | self._context_words[n][i]:
                        df[word] = df.get(word, 0) + 1
            self._segment_count = total
            self._idf_cache = {w: math.log(1 + total / d) for w, d in df.items()}
        return self._idf_cache

    def _question_lexical(
        self, words: set[str], figures: Sequence[Figure], number: int, index: int
    ) -> float:
        """The idf-weighted share of the question's words found in segment ``index`` or its
        caption (its neighbours count half), and of the question's figures (dates, periods,
        amounts: the part of a question that says *which* row or sentence) stated by it."""
        idf = self._idf()
        rare = math.log(1 + max(1, self._segment_count))
        weights = {w: idf.get(w, rare) for w in words}
        # a document code ("10-Q") names the kind of document more than the answer
        heft = [rare * (1.0 if f.kind == "identifier" else QUESTION_FIGURE_WEIGHT) for f in figures]
        total = sum(weights.values()) + sum(heft)
        if not total:
            return 0.0
        segments = self.segments[number]
        own = self._words[number][index]
        # a table row's caption and the text around a segment say what it is about, not it
        near = (
            set().union(*self._words[number][max(0, index - 1) : index + 2])
            | self._context_words[number][index]
        ) - own
        found = sum(v for w, v in weights.items() if w in own)
        found += 0.5 * sum(v for w, v in weights.items() if w in near)
        if figures:
            compared = segments[index].compared
            stated = extract_figures(compared)
            found += sum(
                h
                for f, h in zip(figures, heft, strict=True)
                if find_figure(f, compared, figures=stated)
            )
        return found / total

    def evidence(self, question: str, *, embed: bool = True, shortlist: int = 16) -> list[_Scored]:
        """The passage segments that best answer ``question``, best first: lexical support
        (``_question_lexical``) for every segment, then, when ``embed``, the lexically best
        ``shortlist`` re-scored with the embedding similarity averaged in (their texts embedded
        in one call, cached for the verifier's later checks). Without ``embed`` nothing is
        embedded: milliseconds, for the first streamed event."""
        key = (question, embed, shortlist)
        if key in self._evidence:
            return self._evidence[key]
        words = content_words(_without_figures(question))
        figures = [f for f in extract_figures(question) if f.kind != "number"]
        ranked = sorted(
            (
                _Scored(s, lex, 0.0, lex)
                for n in sorted(self.passages)
                for s in self.segments[n]
                for lex in [self._question_lexical(words, figures, n, s.index)]
            ),
            key=lambda r: -r.score,
        )
        if embed and self._embed is not None:
            top = ranked[:shortlist]
            self._embed_all([question] + [r.segment.compared for r in top])
            for r in top:
                r.similarity = self._similarity(question, r.segment.compared)
                r.score = (
                    EVIDENCE_LEXICAL_WEIGHT * r.lexical
                    + (1 - EVIDENCE_LEXICAL_WEIGHT) * r.similarity
                )
            ranked = sorted(top, key=lambda r: -r.score) + ranked[shortlist:]
        self._evidence[key] = ranked
        return ranked

    def best_segments(self, question: str, limit: int = 3) -> list[_Scored]:
        """The passage sentences or table lines that best answer ``question``, best first."""
        return self.evidence(question)[:limit]

    def spans_for(
        self, question: str, per_passage: int = 2, *, embed: bool = True
    ) -> dict[int, list[tuple[int, int]]]:
        """Per passage, the spans that best match ``question`` (for highlighting); without
        ``embed``, chosen by words and figures alone (no model call)."""
        spans: dict[int, list[tuple[int, int]]] = {n: [] for n in self.passages}
        best: dict[int, float] = {}
        for s in self.evidence(question, embed=embed):
            chosen = spans[s.segment.number]
            top = best.setdefault(s.segment.number, s.score)
            # a heading sharing one word with the question is no evidence beside its text
            if len(chosen) < per_passage and s.score > 0 and s.score >= SPAN_SHARE * top:
                chosen.append((s.segment.start, s.segment.end))
        return {n: sorted(v) for n, v in spans.items()}


_UP = _wordset(
    "increase increased increases increasing rose rise rises grew grow grows growth higher "
    "gain gains gained improved improve favorable favourable up"
)
_DOWN = _wordset(
    "decrease decreased decreases decreasing fell fall falls declined decline declines lower "
    "loss losses drop dropped drops reduced reduce reduces unfavorable unfavourable down"
)


def _direction(text: str) -> set[str]:
    words = set(re.findall(r"[a-z]+", text.lower()))
    return {name for name, group in (("up", _UP), ("down", _DOWN)) if words & group}


def _negation_scope(text: str) -> list[set[str]]:
    """The content words right after each negation cue ("not eligible" -> {"eligible"})."""
    scopes = []
    for match in _NEGATION.finditer(text):
        after = [w for w in content_words(text[match.end() : match.end() + 60]) if w]
        following = [
            stem(w.lower())
            for w in re.findall(r"[^\W_]+", text[match.end() : match.end() + 60])
            if stem(w.lower()) in after
        ]
        scopes.append(set(following[:2]))
    return scopes


def _contradiction(sentence: str, segment: str) -> str:
    """Why the sentence contradicts a segment ('' if it does not): the sentence negates and
    the segment does not, the segment negates words the sentence affirms, or they state
    opposite directions (rose / fell)."""
    if is_negated(sentence) and not is_negated(segment):
        return "negation: the sentence negates, the passage does not"
    if not is_negated(sentence):
        words = content_words(sentence)
        for scope in _negation_scope(segment):
            if scope and scope <= words:
                return "negation: the passage negates " + " ".join(sorted(scope))
    ours, theirs = _direction(sentence), _direction(segment)
    if len(ours) == 1 and len(theirs) == 1 and ours != theirs:
        return f"direction: the sentence says {next(iter(ours))}, the passage {next(iter(theirs))}"
    return ""


def _better(a: Claim, b: Claim) -> bool:
    if a.supported != b.supported:
        return a.supported
    return (a.score or -1.0) > (b.score or -1.0)


def _replace_reason(claim: Claim, reason: str) -> Claim:
    return Claim(
        claim.text, claim.supported, claim.source, claim.start, claim.end, reason, claim.score
    )
