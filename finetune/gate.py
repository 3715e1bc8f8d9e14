"""The gate: the serving model against a candidate, in one run, on the same questions.

Two sets, when present:
    held-out    the dataset's held-out records: each model answers the record's own prompt
                (system + context + question) and is scored against the approved answer;
    golden      the evaluation golden set through the whole answering path (retrieval, prompt,
                generation), so a candidate that answers worse from real retrieval is caught.

Both models are the GGUF files that would be served (quantized), not the training-time
weights: the gate measures what users would get. A candidate is rejected when any headline
metric of either set drops by more than ``max_drop`` points (0.01 = 1 point); on the golden set
the headline metrics include ``faithfulness`` (the share of shown sentences the claim verifier
finds supported), so a candidate that invents more than it used to is rejected even when its
answers overlap the gold ones as much.
"""

from __future__ import annotations

import html
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance.core.evaluation import HEADLINE, GoldenItem, containment, gate, token_f1
from appliance.core.protocols import ChatMessage, ChatModel, GenerationParams

log = logging.getLogger(__name__)

HELDOUT_HEADLINE = ("answer_f1", "answer_containment")

# Golden-set evaluation of one GGUF: runs the answering path with that model.
GoldenEvaluator = Callable[[Path, Sequence[GoldenItem]], dict[str, Any]]


@dataclass
class GateReport:
    reference: str  # the version the candidate is compared with (the serving one)
    candidate: str
    max_drop: float
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures and bool(self.sets)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        return data

    def metrics(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{set: {"reference": {...}, "candidate": {...}}}`` without the per-item rows."""
        return {
            name: {side: result[side]["metrics"] for side in ("reference", "candidate")}
            for name, result in self.sets.items()
        }


def heldout_prompt(record: dict[str, Any]) -> tuple[list[ChatMessage], str]:
    """The messages before the last assistant turn, and that turn's text (the reference)."""
    messages = record["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = [ChatMessage(role=m["role"], content=m["content"]) for m in messages[:last]]
    return prompt, str(messages[last]["content"])


def score_heldout(
    model: ChatModel, records: Sequence[dict[str, Any]], params: GenerationParams
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for record in records:
        prompt, reference = heldout_prompt(record)
        answer, _stats = model.complete(prompt, params)
        rows.append(
            {
                "id": record.get("id"),
                "question": prompt[-1]["content"][-300:] if prompt else "",
                "reference": reference,
                "answer": answer,
                "answer_f1": token_f1(answer, reference),
                "answer_containment": containment(answer, reference),
            }
        )
    n = len(rows) or 1
    metrics: dict[str, float] = {
        name: round(sum(float(r[name]) for r in rows) / n, 4) for name in HELDOUT_HEADLINE
    }
    metrics["questions"] = len(rows)
    return {"metrics": metrics, "questions": rows}


def run_gate(
    *,
    reference: tuple[str, Path],
    candidate: tuple[str, Path],
    load: Callable[[Path], ChatModel],
    heldout: Sequence[dict[str, Any]],
    golden: Sequence[GoldenItem] = (),
    golden_evaluator: GoldenEvaluator | None = None,
    max_drop: float = 2.0,
    max_tokens: int = 200,
    progress: Callable[[str], None] | None = None,
) -> GateReport:
    """Score the reference and the candidate GGUF on the held-out records (and the golden set
    when an evaluator is given) and list the headline metrics the candidate lost."""
    started = time.monotonic()
    report = GateReport(reference=reference[0], candidate=candidate[0], max_drop=max_drop)
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0, seed=0)
    if heldout:
        results: dict[str, Any] = {}
        for side, (_name, path) in (("reference", reference), ("candidate", candidate)):
            if progress:
                progress(f"held-out set: {side}")
            with load(path) as model:
                results[side] = score_heldout(model, heldout, params)
        report.sets["heldout"] = results
        report.failures += [
            f"held-out: {f}"
            for f in gate(
                results["candidate"]["metrics"],
                {k: results["reference"]["metrics"][k] for k in HELDOUT_HEADLINE},
                max_drop,
            )
        ]
    if golden and golden_evaluator is not None:
        results = {}
        for side, (_name, path) in (("reference", reference), ("candidate", candidate)):
            if progress:
                progress(f"golden set: {side}")
            results[side] = golden_evaluator(path, golden)
        report.sets["golden"] = results
        reference_metrics = results["reference"]["metrics"]
        baseline = {k: reference_metrics[k] for k in HEADLINE if k in reference_metrics}
        report.failures += [
            f"golden: {f}" for f in gate(results["candidate"]["metrics"], baseline, max_drop)
        ]
    if not report.sets:
        report.failures.append("nothing to evaluate: no held-out records and no golden set")
    report.seconds = round(time.monotonic() - started, 2)
    return report


def write_report(report: GateReport, folder: Path) -> tuple[Path, Path]:
    """``gate.json`` and a self-contained ``gate.html`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = report.as_json()
    json_path, html_path = folder / "gate.json", folder / "gate.html"
    json_path.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    html_path.write_text(gate_html(report), encoding="utf-8")
    return json_path, html_path


def gate_html(report: GateReport) -> str:
    e = html.escape
    verdict = "passed" if report.passed else "rejected"
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>Gate: {e(report.candidate)}</title><style>",
        "body{font:14px/1.45 system-ui,sans-serif;margin:2em}table{border-collapse:collapse;"
        "margin:1em 0}th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;"
        "vertical-align:top}.bad{background:#ffebe9}.ok{background:#dafbe1}"
        "pre{white-space:pre-wrap;margin:0;max-width:50em}</style></head><body>",
        f"<h1>Gate: {e(report.candidate)} against {e(report.reference)}: {verdict}</h1>",
        f"<p>A headline metric may drop at most {report.max_drop:g} points. "
        f"{report.seconds:g} s.</p>",
    ]
    if report.failures:
        parts.append("<ul class=bad>" + "".join(f"<li>{e(f)}</li>" for f in report.failures))
        parts.append("</ul>")
    for name, result in report.sets.items():
        ref, cand = result["reference"]["metrics"], result["candidate"]["metrics"]
        parts.append(f"<h2>{e(name)} set</h2><table><tr><th>metric</th>")
        parts.append(f"<th>{e(report.reference)}</th><th>{e(report.candidate)}</th></tr>")
        for metric, value in ref.items():
            other = cand.get(metric)
            parts.append(f"<tr><th>{e(metric)}</th><td>{e(str(value))}</td>")
            parts.append(f"<td>{e(str(other))}</td></tr>")
        parts.append("</table><table><tr><th>question</th><th>reference answer</th>")
        parts.append(f"<th>{e(report.reference)}</th><th>{e(report.candidate)}</th></tr>")
        for a, b in zip(
            result["reference"]["questions"], result["candidate"]["questions"], strict=True
        ):
            gold = a.get("reference", a.get("gold_answer", ""))
            parts.append(
                f"<tr><td><pre>{e(str(a.get('question', '')))}</pre></td>"
                f"<td><pre>{e(str(gold))}</pre></td><td><pre>{e(str(a.get('answer', '')))}</pre>"
                f"</td><td><pre>{e(str(b.get('answer', '')))}</pre></td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    return "".join(parts)
