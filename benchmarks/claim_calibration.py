"""Calibration of the claim verifier (issue 10) on the hand-labelled cases of
``tests/data/claims.jsonl``: prints the precision and recall of the shipped threshold and weight
(``answer.support_threshold``, ``answer.support_lexical_weight``), the best point of a grid,
and the cases the shipped settings get wrong.

Positive cases are ``supported`` and ``paraphrase``; precision is the share of sentences let
through that are supported, recall the share of supported sentences let through. The embedding
model is the packaged all-MiniLM-L6-v2, the one retrieval loads anyway.

    .venv/bin/python benchmarks/claim_calibration.py [--grid] [--json]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import _common

CASES = Path(__file__).resolve().parents[1] / "tests" / "data" / "claims.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", action="store_true", help="also search weights and thresholds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    _common.quiet_libraries()

    from appliance.claim_calibration import calibrate, load_cases, measure, score_cases
    from appliance.core.settings import AnswerSettings
    from ingest.embedders import SentenceTransformerEmbedder

    shipped = AnswerSettings()
    cases = load_cases(CASES)
    embedder = SentenceTransformerEmbedder()
    rows = score_cases(cases, embedder.embed, shipped.support_lexical_weight)
    result = measure(rows, shipped.support_threshold, shipped.support_lexical_weight)
    report: dict[str, Any] = {"shipped": asdict(result), "labels": {}}
    for label in ("supported", "paraphrase", "unsupported"):
        of_label = [r for r in rows if r.case.label == label]
        let_through = sum(r.supported(shipped.support_threshold) for r in of_label)
        report["labels"][label] = {"cases": len(of_label), "judged_supported": let_through}
    report["errors"] = [
        {
            "id": r.case.id,
            "label": r.case.label,
            "score": round(r.score, 3),
            "reason": r.reason,
            "claim": r.case.claim,
        }
        for r in rows
        if r.supported(shipped.support_threshold) != r.case.positive
    ]
    if args.grid:
        best, _scored = calibrate(cases, embedder.embed)
        report["grid_best"] = asdict(best)
    if args.json:
        _common.print_json(report)
        return 0
    print(f"{len(cases)} labelled cases from {CASES.name}")
    print("shipped: " + result.line())
    for label, entry in report["labels"].items():
        print(f"  {label:12s} {entry['judged_supported']}/{entry['cases']} judged supported")
    if args.grid:
        print("grid best (recall at precision >= 0.95): " + best.line())
    for error in report["errors"]:
        print(
            f"  wrong: [{error['label']}] {error['score']:.2f} {error['claim']} ({error['reason']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
