"""Answering benchmark (issue 3), in one process:

1. time to first token and tokens/s of the appliance's answer path (retrieval, passages, prompt,
   the llama.cpp backend, the leak guard) against the same GGUF called directly through
   llama-cpp-python with the very same prompt, as ratios (goal: overhead under 10%);
2. retrieval metrics (recall@k, MRR, top-1) on all sec10q questions for dense-only, BM25-only and
   hybrid retrieval;
3. answer metrics of the evaluation harness on a subset of questions, per retrieval mode;
4. the relevance of in-corpus and out-of-corpus questions, which calibrates the abstention
   threshold (answer.min_relevance);
5. claim verification (issue 10) on the first questions: faithfulness (supported sentences /
   sentences), figures no passage states, and answer containment, before verification (what
   the model wrote, against every passage of its prompt) and after (what is shown, against the
   sources it cites); and the time verification adds, as a ratio to the rest of the answer
   time of the same answers (goal: at most 0.05).

    .venv/bin/python benchmarks/answer_quality.py [--data-dir DIR] [--answers N] [--json]
    .venv/bin/python benchmarks/answer_quality.py --only-verification --verify-questions 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _common

OUT_OF_CORPUS = [
    "What is the recommended dose of ibuprofen for a small child?",
    "How do I bake a sourdough loaf at home?",
    "Who won the football world cup in 1998?",
    "What is the boiling point of mercury?",
    "How many moons does Jupiter have?",
    "What are the symptoms of vitamin D deficiency?",
    "How do I change a flat bicycle tyre?",
    "What is the capital of Mongolia?",
    "Which programming language is best for embedded systems?",
    "How long should I boil an egg?",
    "What is the plot of Hamlet?",
    "How do I renew a passport?",
    "What causes the northern lights?",
    "How tall is Mount Kilimanjaro?",
    "What is a good stretching routine for runners?",
    "How does photosynthesis work?",
    "What is the speed of sound in water?",
    "Who painted the Mona Lisa?",
    "What are the rules of chess castling?",
    "How do vaccines train the immune system?",
]


def direct_generation(
    model_path: Path, prompt: str, max_tokens: int, n_threads: int | None, n_ctx: int
) -> dict[str, float]:
    """The baseline: llama-cpp-python alone, the same rendered prompt, greedy decoding."""
    import llama_cpp

    llm = _DIRECT.get(str(model_path))
    if llm is None:
        llm = llama_cpp.Llama(
            str(model_path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            verbose=False,
        )
        _DIRECT[str(model_path)] = llm
    # no reset: like the appliance's backend, llama-cpp-python reuses a matching prompt prefix
    started = time.perf_counter()
    first = None
    n = 0
    for _chunk in llm.create_completion(
        prompt, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.1, stream=True
    ):
        now = time.perf_counter()
        first = first or now
        n += 1
    end = time.perf_counter()
    decode = end - (first or end)
    return {
        "ttft_s": (first or end) - started,
        "tokens": n,
        "tokens_per_s": (n - 1) / decode if n > 1 and decode > 0 else 0.0,
    }


_DIRECT: dict[str, Any] = {}


def appliance_generation(answerer: Any, question: str) -> dict[str, Any]:
    started = time.perf_counter()
    first = None
    final = None
    for event in answerer.stream(question):
        if event["type"] == "token":
            first = first or time.perf_counter()
        else:
            final = event["answer"]
    end = time.perf_counter()
    assert final is not None
    return {
        "ttft_s": (first or end) - started,
        "tokens_per_s": final.timings.get("tokens_per_s", 0.0),
        "tokens": final.timings.get("completion_tokens", 0),
        "abstained": final.abstained,
        "retrieval_s": final.timings.get("retrieval_s", 0.0),
    }


def retrieval_metrics(answerer: Any, items: list[Any], k: int) -> dict[str, float]:
    from appliance.core.evaluation import matches

    recall = mrr = top1 = 0.0
    for item in items:
        hits = answerer.retrieve(item.question)[:k]
        ranks = [i for i, h in enumerate(hits, 1) if matches(h.payload.get("path"), item.evidence)]
        recall += bool(ranks)
        mrr += 1 / ranks[0] if ranks else 0.0
        top1 += bool(ranks and ranks[0] == 1)
    n = len(items)
    return {
        "recall_at_k": round(recall / n, 4),
        "mrr": round(mrr / n, 4),
        "top1": round(top1 / n, 4),
    }


def _final(answerer: Any, question: str) -> tuple[list[str], dict[str, Any]]:
    """The passages of the ``sources`` event and the final answer dict."""
    passages: list[str] = []
    final: dict[str, Any] = {}
    for event in answerer.stream(question):
        if event["type"] == "sources":
            passages = [s["text"] for s in event["sources"]]
        elif event["type"] == "answer":
            final = event["answer"].as_json()
    return passages, final


def verification_report(answerer: Any, items: list[Any], *, paired: bool = True) -> dict[str, Any]:
    """Part 5: before and after verification, and its time, from the same answers.

    Time, two ways: ``overhead_ratio`` is the time answers waited for verification (the first
    event's spans, the checks not finished when the model stopped, the quotes) against the
    rest of their time; with ``paired``, each question is also answered with verification off
    (alternating which goes first, as llama.cpp reuses the prompt just read) and
    ``paired_overhead_ratio`` compares the total times, which includes what the checks running
    beside the model cost its decoding (noisy on a busy machine)."""
    from appliance.core.evaluation import containment, figure_counts
    from appliance.core.figures import missing_figures

    generated = supported = shown = shown_supported = 0
    figures_before = missing_before = figures_after = missing_after = 0
    contain_before: list[float] = []
    contain_after: list[float] = []
    verify_s = rest_s = work_s = on_s = off_s = 0.0
    quoted = answered = 0
    for i, item in enumerate(items):
        if paired and i % 2:
            off_s += _unchecked_time(answerer, item.question)
        passages, final = _final(answerer, item.question)
        if paired and not i % 2:
            off_s += _unchecked_time(answerer, item.question)
        on_s += final["timings"]["total_s"]
        if final["abstained"]:
            continue
        answered += 1
        quoted += final["mode"] == "quoted"
        written = final["claims"] if final["mode"] == "generated" else final["unsupported_claims"]
        written = [c for c in written if c.get("reason") != "quoted"]
        text = " ".join(c["text"] for c in written)
        generated += len(written)
        supported += sum(c["supported"] for c in written)
        missing, total = missing_figures(text, passages)
        figures_before += total
        missing_before += len(missing)
        visible = [c for c in final["claims"] if c.get("shown")]
        shown += len(visible)
        shown_supported += sum(c["supported"] for c in visible)
        gone, total = figure_counts(final)
        figures_after += total
        missing_after += gone
        if item.answer:
            contain_before.append(containment(text, item.answer))
            contain_after.append(containment(final["answer"], item.answer))
        timings = final["timings"]
        verify_s += timings.get("verify_s", 0.0)
        work_s += timings.get("verify_work_s", 0.0)
        rest_s += timings["total_s"] - timings.get("verify_s", 0.0)
    report = {
        "questions": len(items),
        "answered": answered,
        "quoted": quoted,
        "faithfulness_before": round(supported / generated, 4) if generated else 1.0,
        "faithfulness_after": round(shown_supported / shown, 4) if shown else 1.0,
        "unsupported_number_rate_before": round(missing_before / figures_before, 4)
        if figures_before
        else 0.0,
        "unsupported_number_rate_after": round(missing_after / figures_after, 4)
        if figures_after
        else 0.0,
        "figures_before": figures_before,
        "figures_after": figures_after,
        "containment_before": round(statistics.fmean(contain_before), 4) if contain_before else 0,
        "containment_after": round(statistics.fmean(contain_after), 4) if contain_after else 0,
        "verify_s": round(verify_s, 3),
        "verify_work_s": round(work_s, 3),
        "answer_s_without_verification": round(rest_s, 3),
        "overhead_ratio": round(verify_s / rest_s, 4) if rest_s else 0.0,
    }
    if paired:
        report |= {
            "checked_total_s": round(on_s, 3),
            "unchecked_total_s": round(off_s, 3),
            "paired_overhead_ratio": round(on_s / off_s - 1, 4) if off_s else 0.0,
        }
    return report


def _unchecked_time(answerer: Any, question: str) -> float:
    answerer.settings.verify = False
    try:
        return float(_final(answerer, question)[1]["timings"]["total_s"])
    finally:
        answerer.settings.verify = True


def print_verification(v: dict[str, Any]) -> None:
    print(
        f"claim verification ({v['answered']} of {v['questions']} questions answered, "
        f"{v['quoted']} as quotes):"
    )
    print(
        f"  faithfulness             before {v['faithfulness_before']:.3f}  "
        f"after {v['faithfulness_after']:.3f}"
    )
    print(
        f"  unsupported number rate  before {v['unsupported_number_rate_before']:.3f} "
        f"({v['figures_before']} figures)  after {v['unsupported_number_rate_after']:.3f} "
        f"({v['figures_after']} figures)"
    )
    print(
        f"  answer containment       before {v['containment_before']:.3f}  "
        f"after {v['containment_after']:.3f}"
    )
    print(
        f"  time: answers waited {v['verify_s']:.2f} s for verification against "
        f"{v['answer_s_without_verification']:.1f} s for the rest of the same answers: "
        f"overhead ratio {v['overhead_ratio']:.4f} (the checks ran {v['verify_work_s']:.2f} s "
        "in all, mostly beside the model)"
    )
    if "paired_overhead_ratio" in v:
        print(
            f"  paired: the same questions took {v['checked_total_s']:.1f} s checked and "
            f"{v['unchecked_total_s']:.1f} s unchecked: ratio {v['paired_overhead_ratio']:+.4f}"
        )


def print_report(report: dict[str, Any], k: int) -> None:
    if "verification" in report:
        print_verification(report["verification"])
    if "overhead" not in report:
        return
    o = report["overhead"]
    print(f"answer path vs llama-cpp-python alone, same prompt ({o['questions']} questions):")
    print(
        f"  time to first token  appliance {o['appliance_ttft_p50_s']:.3f} s  "
        f"direct {o['direct_ttft_p50_s']:.3f} s  ratio {o['ttft_ratio']:.3f} "
        f"(retrieval {o['retrieval_p50_s']:.3f} s)"
    )
    print(
        f"  tokens/s             appliance {o['appliance_tokens_per_s']:.1f}  "
        f"direct {o['direct_tokens_per_s']:.1f}  ratio {o['tokens_per_s_ratio']:.3f}"
    )
    for mode, entry in report["modes"].items():
        r = entry["retrieval"]
        print(
            f"{mode:7s} retrieval: recall@{k} {r['recall_at_k']:.3f}  MRR {r['mrr']:.3f}  "
            f"top-1 {r['top1']:.3f}"
        )
        if "answers" in entry:
            a = entry["answers"]
            print(
                f"        answers ({a['questions']} q): F1 {a['answer_f1']:.3f}  "
                f"containment {a['answer_containment']:.3f}  "
                f"citation precision {a['citation_precision']:.3f}  "
                f"abstention {a['abstention_rate']:.3f}  TTFT p50 {a['ttft_p50_s']:.2f} s  "
                f"{a['tokens_per_s']:.1f} tok/s"
            )
    a = report["abstention"]
    print(
        f"abstention threshold {a['threshold']}: in-corpus relevance min {a['in_corpus_min']} "
        f"(p05 {a['in_corpus_p05']}), out-of-corpus max {a['out_of_corpus_max']} "
        f"(p95 {a['out_of_corpus_p95']}); in-corpus abstained {a['in_corpus_abstained']}, "
        f"out-of-corpus answered {a['out_of_corpus_answered']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, help="reuse this index folder between runs")
    parser.add_argument("--speed-questions", type=int, default=5, help="questions timed (part 1)")
    parser.add_argument(
        "--answers", type=int, default=15, help="questions answered per mode (part 3)"
    )
    parser.add_argument("--modes", default="dense,sparse,hybrid")
    parser.add_argument(
        "--verify-questions", type=int, default=10, help="questions of part 5 (0: skip it)"
    )
    parser.add_argument(
        "--only-verification", action="store_true", help="run part 5 alone (it takes minutes)"
    )
    parser.add_argument(
        "--no-paired",
        action="store_true",
        help="part 5 without answering each question a second time with verification off",
    )
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

    from appliance.core.evaluation import evaluate, load_golden
    from appliance.core.settings import load_settings
    from appliance.wiring import build_answerer, open_ingestion, prepare_process

    items = load_golden(_common.SEC10Q / "qa.jsonl")
    report: dict[str, Any] = {"machine": _common.machine()}
    with _common.data_folder(args.data_dir, "answer-bench") as data:
        settings = load_settings(env={}, overrides={"data_dir": str(data)})
        prepare_process(settings)
        with open_ingestion(settings, _common.SEC10Q_DOCS, role="benchmark") as ingestion:
            ingestion.indexer.reconcile()
            answerer = build_answerer(settings, ingestion)
            if args.verify_questions:
                report["verification"] = verification_report(
                    answerer, items[: args.verify_questions], paired=not args.no_paired
                )
            if args.only_verification:
                if args.json:
                    _common.print_json(report)
                else:
                    print_report(report, settings.answer.top_k)
                return 0

            # 1. overhead against llama-cpp-python alone
            chat = answerer.chat
            rows = []
            questions = [i.question for i in items][: args.speed_questions]
            appliance_generation(answerer, questions[0])  # warm caches for both sides
            for question in questions:
                prepared = answerer.prepare(question)
                prompt = chat.render_prompt(prepared.messages)
                app = appliance_generation(answerer, question)
                # the same thread count as the appliance's backend (llama-cpp-python's own
                # default is half the cores, which would compare different things)
                direct = direct_generation(
                    chat.path,
                    prompt,
                    settings.chat.max_tokens,
                    settings.chat.n_threads or os.cpu_count(),
                    chat.context_length,
                )
                rows.append({"question": question, "appliance": app, "direct": direct})
            answered = [r for r in rows if not r["appliance"]["abstained"]]
            app_ttft = statistics.median(r["appliance"]["ttft_s"] for r in answered)
            dir_ttft = statistics.median(r["direct"]["ttft_s"] for r in answered)
            app_tps = statistics.median(r["appliance"]["tokens_per_s"] for r in answered)
            dir_tps = statistics.median(r["direct"]["tokens_per_s"] for r in answered)
            report["overhead"] = {
                "questions": len(answered),
                "appliance_ttft_p50_s": round(app_ttft, 3),
                "direct_ttft_p50_s": round(dir_ttft, 3),
                "ttft_ratio": round(app_ttft / dir_ttft, 3),
                "appliance_tokens_per_s": round(app_tps, 1),
                "direct_tokens_per_s": round(dir_tps, 1),
                "tokens_per_s_ratio": round(app_tps / dir_tps, 3),
                "retrieval_p50_s": round(
                    statistics.median(r["appliance"]["retrieval_s"] for r in answered), 3
                ),
            }

            # 2. and 3. per retrieval mode
            report["modes"] = {}
            for mode in args.modes.split(","):
                answerer.settings.retrieval_mode = mode
                entry: dict[str, Any] = {
                    "retrieval": retrieval_metrics(answerer, items, settings.answer.top_k)
                }
                if args.answers:
                    result = evaluate(
                        items[: args.answers],
                        lambda q: answerer.answer(q).as_json(),
                        k=settings.answer.top_k,
                    )
                    entry["answers"] = result["metrics"]
                report["modes"][mode] = entry
            answerer.settings.retrieval_mode = "hybrid"

            # 4. abstention calibration
            inside = [answerer.prepare(i.question).answer.relevance for i in items]
            outside = [answerer.prepare(q).answer.relevance for q in OUT_OF_CORPUS]
            threshold = settings.answer.min_relevance
            report["abstention"] = {
                "threshold": threshold,
                "in_corpus_min": round(min(inside), 3),
                "in_corpus_p05": round(sorted(inside)[len(inside) // 20], 3),
                "out_of_corpus_max": round(max(outside), 3),
                "out_of_corpus_p95": round(sorted(outside)[int(len(outside) * 0.95) - 1], 3),
                "in_corpus_abstained": round(sum(v < threshold for v in inside) / len(inside), 3),
                "out_of_corpus_answered": round(
                    sum(v >= threshold for v in outside) / len(outside), 3
                ),
            }
    if args.json:
        _common.print_json(report)
        return 0
    print_report(report, settings.answer.top_k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
