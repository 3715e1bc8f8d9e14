"""The evaluation harness: retrieval and answer metrics over a golden set, a regression gate and
a self-contained HTML report.

Golden lines are ``{"id", "question", "answer", "evidence_doc": [file names]}`` (extra fields
allowed). A retrieved or cited path matches an evidence document when its file name (or its
whole relative path) equals one of them.

Metrics, per question and as means over the set:
    recall_at_k          an evidence document among the k retrieved chunks
    mrr                  1 / rank of the first chunk from an evidence document (0 if none)
    answer_f1            token F1 of answer and gold answer (lower-cased, punctuation and
                         articles removed, as in SQuAD)
    answer_containment   the share of the gold answer's tokens that the answer contains
    citation_precision   cited sources that come from an evidence document (questions with
                         at least one source)
    abstention_rate      answers that say the documents do not cover the question
    ttft_p50_s           median time to first token; tokens_per_s: mean decoding rate
    faithfulness         supported sentences shown / sentences shown, over the set (the claim
                         verifier's judgement; 1.0 when nothing was shown)
    unsupported_number_rate
                         figures in shown answers that no cited source states / figures shown
    evidence_recall      figures of the gold answers found in the top-k retrieved chunks /
                         figures of the gold answers (file names and SOURCE lines left out)
    quoted_rate          answers given as quotes of the passages (nothing generated was
                         supported)
"""

from __future__ import annotations

import html
import json
import re
import statistics
import string
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from appliance.core.errors import ApplianceError
from appliance.core.figures import missing_figures

HEADLINE = (
    "recall_at_k",
    "mrr",
    "answer_f1",
    "answer_containment",
    "citation_precision",
    "faithfulness",
)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True)
class GoldenItem:
    id: str
    question: str
    answer: str
    evidence: tuple[str, ...]


def load_golden(path: Path, limit: int | None = None) -> list[GoldenItem]:
    items: list[GoldenItem] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ApplianceError(f"cannot read the golden set {path}: {exc.strerror}") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            evidence = record.get("evidence_doc") or []
            if isinstance(evidence, str):
                evidence = [evidence]
            items.append(
                GoldenItem(
                    id=str(record.get("id", n)),
                    question=str(record["question"]),
                    answer=str(record.get("answer", "")),
                    evidence=tuple(str(e) for e in evidence),
                )
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ApplianceError(
                f"{path}:{n}: each line must be a JSON object with at least a 'question'"
            ) from exc
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise ApplianceError(f"the golden set {path} has no questions")
    return items


def normalize(text: str) -> list[str]:
    text = text.lower().translate(_PUNCT)
    return _ARTICLES.sub(" ", text).split()


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize(prediction), normalize(gold)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def containment(prediction: str, gold: str) -> float:
    ref = normalize(gold)
    if not ref:
        return 0.0
    return sum((Counter(ref) & Counter(normalize(prediction))).values()) / len(ref)


def matches(path: str | None, evidence: Sequence[str]) -> bool:
    if not path:
        return False
    name = PurePosixPath(path).name
    return any(path == e or name == PurePosixPath(e).name for e in evidence)


_SOURCE_NOTE = re.compile(r"\(SOURCE[^)]*\)|^SOURCE\(?S?\)?:.*$", re.IGNORECASE | re.MULTILINE)
_FILE_NAME = re.compile(r"[^\s,;:()]*\.(?:pdf|docx?|txt|md|html?|xlsx?|csv|pptx?)\b", re.IGNORECASE)
_CITATION = re.compile(r"\[\d{1,3}(?:\s*,\s*\d{1,3})*\]")
_QUOTE_LABEL = "Quoted from the documents:"


def gold_figure_text(gold: str) -> str:
    """A gold answer without what names documents rather than states facts ("(SOURCE: 2023
    Q1 AAPL.pdf)"), whose years and codes would count as figures."""
    return _FILE_NAME.sub(" ", _SOURCE_NOTE.sub(" ", gold))


def shown_claims(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The checked sentences a person was shown (answers from before verification have none)."""
    return [c for c in result.get("claims") or [] if c.get("shown", c.get("supported"))]


def figure_counts(result: dict[str, Any]) -> tuple[int, int]:
    """(figures in the shown answer that no cited source states, figures shown)."""
    if result.get("abstained"):
        return 0, 0
    text = _CITATION.sub(" ", str(result.get("answer", "")).replace(_QUOTE_LABEL, " "))
    sources = [str(s.get("text", "")) for s in result.get("sources", [])]
    missing, total = missing_figures(text, sources)
    return len(missing), total


def evidence_counts(gold: str, result: dict[str, Any], k: int) -> tuple[int, int]:
    """(figures of the gold answer found in the top-k retrieved chunks, gold figures)."""
    texts = [str(r["text"]) for r in result.get("retrieved", [])[:k] if r.get("text")]
    missing, total = missing_figures(gold_figure_text(gold), texts)
    return total - len(missing), total


def _generated_text(result: dict[str, Any]) -> str:
    """What the model wrote, before verification dropped or replaced anything."""
    claims = result.get("claims") or []
    if result.get("mode") == "quoted":
        claims = result.get("unsupported_claims") or []
    return " ".join(str(c.get("text", "")) for c in claims) if claims else result.get("answer", "")


def score_question(item: GoldenItem, result: dict[str, Any], k: int) -> dict[str, Any]:
    """Per-question metrics from an answer's JSON (``Answer.as_json()``)."""
    retrieved = [r.get("path") for r in result.get("retrieved", [])][:k]
    ranks = [i for i, path in enumerate(retrieved, 1) if matches(path, item.evidence)]
    sources = result.get("sources", [])
    cited_ok = [matches(s.get("path"), item.evidence) for s in sources]
    timings = result.get("timings", {})
    answered = not result.get("abstained")
    shown = shown_claims(result) if answered else []
    unsupported_figures, figures = figure_counts(result)
    gold_found, gold_figures = evidence_counts(item.answer, result, k)
    return {
        "id": item.id,
        "question": item.question,
        "gold_answer": item.answer,
        "evidence_doc": list(item.evidence),
        "answer": result.get("answer", ""),
        "abstained": bool(result.get("abstained")),
        "retrieved": retrieved,
        "sources": [
            {"path": s.get("path"), "page": s.get("page"), "heading": s.get("heading")}
            for s in sources
        ],
        "recall_at_k": float(bool(ranks)),
        "mrr": 1.0 / ranks[0] if ranks else 0.0,
        "answer_f1": token_f1(result.get("answer", ""), item.answer) if item.answer else None,
        "answer_containment": containment(result.get("answer", ""), item.answer)
        if item.answer
        else None,
        "citation_precision": sum(cited_ok) / len(cited_ok) if cited_ok else None,
        "ttft_s": timings.get("ttft_s") if answered else None,
        "total_s": timings.get("total_s"),
        "tokens_per_s": timings.get("tokens_per_s") if answered else None,
        "mode": result.get("mode", "generated"),
        "generated": _generated_text(result),
        "verify_s": timings.get("verify_s"),
        "claims_shown": len(shown),
        "claims_supported": sum(bool(c.get("supported")) for c in shown),
        "figures_shown": figures,
        "figures_unsupported": unsupported_figures,
        "gold_figures": gold_figures,
        "gold_figures_found": gold_found,
    }


def _mean(values: Iterable[float | None]) -> float:
    present = [v for v in values if v is not None]
    return round(statistics.fmean(present), 4) if present else 0.0


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    ttfts = [r["ttft_s"] for r in rows if r["ttft_s"] is not None]
    return {
        "recall_at_k": _mean(r["recall_at_k"] for r in rows),
        "mrr": _mean(r["mrr"] for r in rows),
        "answer_f1": _mean(r["answer_f1"] for r in rows),
        "answer_containment": _mean(r["answer_containment"] for r in rows),
        "citation_precision": _mean(r["citation_precision"] for r in rows),
        "abstention_rate": _mean(float(r["abstained"]) for r in rows),
        "ttft_p50_s": round(statistics.median(ttfts), 4) if ttfts else 0.0,
        "tokens_per_s": _mean(r["tokens_per_s"] for r in rows),
        "faithfulness": _ratio(rows, "claims_supported", "claims_shown", empty=1.0),
        "unsupported_number_rate": _ratio(rows, "figures_unsupported", "figures_shown"),
        "evidence_recall": _ratio(rows, "gold_figures_found", "gold_figures"),
        "quoted_rate": _mean(float(r["mode"] == "quoted") for r in rows),
        "questions": len(rows),
    }


def _ratio(rows: Sequence[dict[str, Any]], part: str, whole: str, empty: float = 0.0) -> float:
    """A ratio over the whole set (each figure or sentence counts once, whichever answer)."""
    total = sum(int(r.get(whole) or 0) for r in rows)
    return round(sum(int(r.get(part) or 0) for r in rows) / total, 4) if total else empty


def evaluate(
    items: Sequence[GoldenItem],
    ask: Callable[[str], dict[str, Any]],
    *,
    k: int,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Ask every question and score it: ``{"metrics": {...}, "questions": [...]}``."""
    rows = []
    started = time.monotonic()
    for i, item in enumerate(items):
        rows.append(score_question(item, ask(item.question), k))
        if progress:
            progress(i + 1, len(items))
    return {
        "metrics": summarize(rows),
        "questions": rows,
        "k": k,
        "seconds": round(time.monotonic() - started, 2),
    }


def gate(metrics: dict[str, float], baseline: dict[str, float], max_drop: float) -> list[str]:
    """Headline metrics that dropped by more than ``max_drop`` points (1 point = 0.01)."""
    failures = []
    for name in HEADLINE:
        if name not in baseline:
            continue
        drop = (float(baseline[name]) - float(metrics.get(name, 0.0))) * 100
        if drop > max_drop:
            failures.append(
                f"{name} dropped {drop:.1f} points "
                f"({baseline[name]:.3f} -> {metrics.get(name, 0):.3f})"
            )
    return failures


def load_baseline(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ApplianceError(f"cannot read the baseline {path}: {exc}") from exc
    metrics = data.get("metrics", data) if isinstance(data, dict) else None
    if not isinstance(metrics, dict):
        raise ApplianceError(f"the baseline {path} has no metrics object")
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#1b1f23}
table{border-collapse:collapse;margin:1em 0;width:100%}th,td{border:1px solid #d0d7de;
padding:4px 8px;text-align:left;vertical-align:top}th{background:#f6f8fa}
td.n{text-align:right;font-variant-numeric:tabular-nums}.bad{background:#ffebe9}
.ok{background:#dafbe1}details{max-width:60em}pre{white-space:pre-wrap;margin:0}
"""


def html_report(result: dict[str, Any], title: str = "Evaluation report") -> str:
    """One self-contained HTML file: no scripts, fonts or styles from elsewhere."""
    e = html.escape
    metrics = result["metrics"]

    def num(value: Any) -> str:
        return (
            "" if value is None else (f"{value:.3f}" if isinstance(value, float) else e(str(value)))
        )

    summary = "".join(
        f"<tr><th>{e(k)}</th><td class=n>{num(v)}</td></tr>" for k, v in metrics.items()
    )
    rows = []
    for q in result["questions"]:
        css = "ok" if q["recall_at_k"] else "bad"
        sources = "<br>".join(
            e(f"{s['path']}" + (f" p.{s['page']}" if s.get("page") else "")) for s in q["sources"]
        )
        rows.append(
            f"<tr class={css}><td>{e(q['id'])}</td><td>{e(q['question'])}"
            f"<details><summary>answers</summary><b>answer</b><pre>{e(q['answer'])}</pre>"
            f"<b>gold</b><pre>{e(q['gold_answer'])}</pre></details></td>"
            f"<td>{e(', '.join(q['evidence_doc']))}</td><td>{sources}</td>"
            f"<td class=n>{num(q['recall_at_k'])}</td><td class=n>{num(q['mrr'])}</td>"
            f"<td class=n>{num(q['answer_f1'])}</td><td class=n>{num(q['citation_precision'])}</td>"
            f"<td>{'yes' if q['abstained'] else ''}</td><td>{e(str(q.get('mode', '')))}</td>"
            f"<td class=n>{q.get('claims_supported', '')}/{q.get('claims_shown', '')}</td>"
            f"<td class=n>{q.get('figures_unsupported', '')}/{q.get('figures_shown', '')}</td>"
            f"<td class=n>{q.get('gold_figures_found', '')}/{q.get('gold_figures', '')}</td>"
            f"<td class=n>{num(q['ttft_s'])}</td></tr>"
        )
    return (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{e(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>"
        f"<p>{metrics['questions']} questions, k = {result.get('k')}, "
        f"{result.get('seconds', 0)} s.</p><table>{summary}</table>"
        "<table><tr><th>id</th><th>question</th><th>evidence</th><th>cited</th><th>recall@k</th>"
        "<th>MRR</th><th>F1</th><th>citation precision</th><th>abstained</th><th>mode</th>"
        "<th>supported / shown sentences</th><th>unsupported / shown figures</th>"
        "<th>gold figures retrieved</th><th>TTFT s</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )
