"""Evidence first (issue 10), in one process over the sec10q filings: how soon the sources
reach a person, against how soon the answer starts (the baseline), with the chat model free
and with it busy answering someone else.

1. free: per question, the time from asking to the ``sources`` event and to the first token;
2. busy: the same questions, each asked while another question holds the model mid-answer
   for ``--hold`` seconds: the time to ``sources`` (it should not grow), to the first
   ``queue`` event (the place in line), and to the first token (it grows by the hold).

Printed ratios: sources / first token (free), and busy sources / free sources.

    .venv/bin/python benchmarks/evidence_first.py [--data-dir DIR] [--questions N] [--hold S]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import _common


def timed_events(answerer: Any, question: str) -> dict[str, float]:
    """Seconds from asking to the first event of each type."""
    started = time.perf_counter()
    first: dict[str, float] = {}
    for event in answerer.stream(question):
        first.setdefault(event["type"], round(time.perf_counter() - started, 4))
    return first


def busy_events(answerer: Any, question: str, other: str, hold_s: float) -> dict[str, float]:
    """``timed_events`` while ``other`` holds the model, released ``hold_s`` after asking."""
    held = answerer.stream(other)
    next(e for e in held if e["type"] == "token")  # ``other`` has the model's turn
    release = threading.Timer(hold_s, lambda: list(held))
    release.start()
    try:
        return timed_events(answerer, question)
    finally:
        release.join()


def median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows if key in r)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, help="reuse this index folder between runs")
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--hold", type=float, default=3.0, help="seconds the model stays busy")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    _common.setup_logging(args.verbose)
    try:
        _common.require_dir(_common.SEC10Q_DOCS, "the SEC 10-Q corpus")
    except _common.CorpusMissing as exc:
        print(exc, file=sys.stderr)
        return 2
    _common.quiet_libraries()

    from appliance.core.evaluation import load_golden
    from appliance.core.settings import load_settings
    from appliance.wiring import build_answerer, open_ingestion, prepare_process

    items = load_golden(_common.SEC10Q / "qa.jsonl")
    questions = [i.question for i in items][: args.questions]
    other = items[-1].question
    report: dict[str, Any] = {"machine": _common.machine(), "hold_s": args.hold}
    with _common.data_folder(args.data_dir, "evidence-bench") as data:
        settings = load_settings(env={}, overrides={"data_dir": str(data)})
        prepare_process(settings)
        with open_ingestion(settings, _common.SEC10Q_DOCS, role="benchmark") as ingestion:
            ingestion.indexer.reconcile()
            answerer = build_answerer(settings, ingestion)
            timed_events(answerer, questions[0])  # warm caches
            free = [timed_events(answerer, q) for q in questions]
            busy = [busy_events(answerer, q, other, args.hold) for q in questions]
    free_sources, free_token = median(free, "sources"), median(free, "token")
    busy_sources = median(busy, "sources")
    report.update(
        {
            "questions": len(questions),
            "free_sources_p50_s": free_sources,
            "free_first_token_p50_s": free_token,
            "sources_over_first_token": round(free_sources / free_token, 3),
            "busy_sources_p50_s": busy_sources,
            "busy_queue_p50_s": median(busy, "queue"),
            "busy_first_token_p50_s": median(busy, "token"),
            "busy_over_free_sources": round(busy_sources / free_sources, 3),
            "busy_told_place": sum("queue" in r for r in busy),
        }
    )
    if args.json:
        _common.print_json(report)
        return 0
    print(f"Evidence first: {len(questions)} sec10q questions, medians")
    print(
        f"  model free: sources {free_sources:.3f} s, first token {free_token:.3f} s "
        f"(sources / first token {report['sources_over_first_token']:.3f})"
    )
    print(
        f"  model busy ({args.hold:g} s): sources {busy_sources:.3f} s "
        f"(busy / free {report['busy_over_free_sources']:.3f}), place in line "
        f"{report['busy_queue_p50_s']:.3f} s, first token "
        f"{report['busy_first_token_p50_s']:.3f} s; "
        f"told their place: {report['busy_told_place']}/{len(questions)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
