"""Calibrating the claim verifier's support threshold on hand-labelled cases.

Each case (``tests/data/claims.jsonl``) is one passage, one sentence and a label:
``supported`` (stated in the passage's words), ``paraphrase`` (stated in other words: also
supported) or ``unsupported`` (a wrong figure, an invented fact, a contradiction). The verifier
scores every case once per lexical weight, with the threshold out of the way; a threshold then
decides, and precision and recall are those of the "supported" decision (precision: of the
sentences let through, the share that are supported; recall: of the supported sentences, the
share let through). Precision matters more: a sentence let through wrongly looks verified.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.verification import Embed, Verifier

POSITIVE = frozenset({"supported", "paraphrase"})


@dataclass(frozen=True)
class Case:
    id: str
    domain: str
    passage: str
    claim: str
    label: str

    @property
    def positive(self) -> bool:
        return self.label in POSITIVE


@dataclass(frozen=True)
class _Passage:
    number: int
    text: str


@dataclass(frozen=True)
class Scored:
    case: Case
    passes_checks: bool
    """Figures found, no negation or direction conflict (what the threshold cannot override)."""
    score: float
    reason: str

    def supported(self, threshold: float) -> bool:
        return self.passes_checks and self.score >= threshold


@dataclass(frozen=True)
class Calibration:
    threshold: float
    lexical_weight: float
    precision: float
    recall: float
    f1: float
    cases: int

    def line(self) -> str:
        return (
            f"threshold {self.threshold:.2f}  lexical weight {self.lexical_weight:.2f}  "
            f"precision {self.precision:.3f}  recall {self.recall:.3f}  F1 {self.f1:.3f}  "
            f"({self.cases} cases)"
        )


def load_cases(path: Path) -> list[Case]:
    cases = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            cases.append(Case(r["id"], r["domain"], r["passage"], r["claim"], r["label"]))
    return cases


def score_cases(cases: Sequence[Case], embed: Embed | None, lexical_weight: float) -> list[Scored]:
    rows = []
    for case in cases:
        verifier = Verifier(
            [_Passage(1, case.passage)], embed, threshold=-1.0, lexical_weight=lexical_weight
        )
        claim = verifier.verify(case.claim)
        rows.append(Scored(case, claim.supported, claim.score or 0.0, claim.reason))
    return rows


def measure(rows: Sequence[Scored], threshold: float, lexical_weight: float) -> Calibration:
    tp = sum(r.supported(threshold) and r.case.positive for r in rows)
    fp = sum(r.supported(threshold) and not r.case.positive for r in rows)
    fn = sum(not r.supported(threshold) and r.case.positive for r in rows)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Calibration(
        threshold, lexical_weight, round(precision, 4), round(recall, 4), round(f1, 4), len(rows)
    )


def calibrate(
    cases: Sequence[Case],
    embed: Embed | None,
    *,
    weights: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7),
    min_precision: float = 0.95,
) -> tuple[Calibration, dict[float, list[Scored]]]:
    """The (threshold, weight) with the best recall at ``min_precision`` or more (the best F1
    when none reaches it), and the scored cases per weight."""
    caching = _caching(embed) if embed is not None else None
    scored = {w: score_cases(cases, caching, w) for w in weights}
    best: Calibration | None = None
    for w, rows in scored.items():
        for t in sorted({round(r.score, 2) for r in rows} | {0.0}):
            c = measure(rows, t, w)
            key = (
                c.precision >= min_precision,
                c.recall if c.precision >= min_precision else c.f1,
                c.precision,
            )
            if best is None or key > (
                best.precision >= min_precision,
                best.recall if best.precision >= min_precision else best.f1,
                best.precision,
            ):
                best = c
    assert best is not None
    return best, scored


def _caching(embed: Embed) -> Embed:
    cache: dict[str, list[float]] = {}

    def cached(texts: list[str]) -> list[list[float]]:
        missing = [t for t in dict.fromkeys(texts) if t not in cache]
        if missing:
            cache.update(zip(missing, embed(missing), strict=True))
        return [cache[t] for t in texts]

    return cached
