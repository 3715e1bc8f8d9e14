"""Continuous batching: decode throughput at 1, 2, 4 and 8 concurrent streams, KV cache memory
per slot, and the prefill saved by prefix reuse, all in this one process.

The default SmolLM2-135M GGUF answers the same eight prompts at each concurrency, through the
``ChatModel`` interface the answering service uses: ``C`` threads take the prompts from one
list, each streaming its answer (greedy, ``--tokens`` at most). The baseline is today's serial
engine (``chat.parallel: 1``) given the same eight prompts from eight threads: it answers them
one at a time. Rounds alternate the engines so that a change in the machine's load hits both.

- aggregate tokens/s: answer tokens of the eight prompts / the wall time to answer them all;
- per-sequence tokens/s: each answer's decode rate after its first token, the mean;
- tokens per CPU second: answer tokens / the process's CPU time over the same span. On a
  machine that other jobs keep busy, wall-clock rates measure the share of the CPU this
  process got as much as the engine; CPU time per token is what batching saves;
- KV cache: llama.cpp's f16 cache size per slot, and the resident memory the 8-slot engine
  took beyond a 1-slot one, per added slot;
- prefix reuse: colleagues' questions over the same passages (the prompt puts the passages
  before the question); prompt tokens prefilled against those taken from the cache, and the
  time to first token with a cold cache against a warm one.

    python benchmarks/batching_throughput.py [--tokens N] [--rounds N] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import load_note, machine, print_json, quiet_libraries, ratio, setup_logging

from appliance.core.errors import ApplianceError

PROMPTS = [
    "Write a detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain step by step how a bill becomes a law, with examples.",
    "Describe the water cycle to a ten year old, in several paragraphs.",
    "Write a long letter to a friend about a trip to the mountains.",
    "Explain how a refrigerator works and why it needs electricity.",
    "Describe a busy market in the morning, with its sounds and smells.",
    "Tell the history of the bicycle, from its invention to today.",
    "Explain why audit logs are kept for several years, and how they are protected.",
]
CONCURRENCY = (1, 2, 4, 8)

PASSAGES = [
    "Audit logs of the appliance are retained for seven years under policy AP-12. They are "
    "written to append-only storage, hashed in a chain, and copied to the offsite archive "
    "every night. Only the compliance team may export them, and every export is itself logged.",
    "Backups run every night at 02:00. The full backup is kept for 35 days and the monthly "
    "backup for one year. A restore test is carried out each quarter by the operations team, "
    "who record the time it took and any file that failed to restore.",
    "Leave requests are approved by the employee's line manager within five working days. "
    "Requests longer than three weeks also need the approval of the department head. Unused "
    "leave of up to five days may be carried over to the next year.",
    "Access badges are issued by facilities on the first day of employment. A lost badge must "
    "be reported within 24 hours; it is disabled at once and a replacement costs 15 euros. "
    "Visitors receive a day badge and must be escorted at all times.",
    "Expense claims must be filed within 30 days with the original receipts attached. Claims "
    "above 500 euros need the approval of the budget holder. Travel is booked through the "
    "company's travel desk, and economy class is the rule for flights under six hours.",
]
QUESTIONS = [
    "How long are audit logs retained?",
    "Who may export the audit logs?",
    "When do backups run?",
    "How long is the monthly backup kept?",
    "Who approves leave requests?",
    "What happens when a badge is lost?",
    "When must expense claims be filed?",
    "How are flights booked?",
]


def _messages(question: str, passages: Sequence[str]) -> list[Any]:
    from appliance.core.prompting import SYSTEM_PROMPT

    context = "\n\n".join(f"[{i}] {text}" for i, text in enumerate(passages, start=1))
    user = f"Context:\n{context}\n\nQuestion: {question}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def _rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def answer_all(model: Any, prompts: Sequence[str], concurrency: int, tokens: int) -> dict:
    """The prompts answered by ``concurrency`` threads; aggregate and per-sequence rates."""
    from appliance.core.protocols import GenerationParams

    params = GenerationParams(max_tokens=tokens, temperature=0.0)
    todo = list(enumerate(prompts))
    lock = threading.Lock()
    stats: list[Any] = []
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                _, prompt = todo.pop(0)
            try:
                _, generation = model.complete([{"role": "user", "content": prompt}], params)
            except BaseException as exc:
                errors.append(exc)
                return
            with lock:
                stats.append(generation)

    started, cpu = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    if errors:
        raise errors[0]
    generated = sum(g.completion_tokens for g in stats)
    return {
        "streams": concurrency,
        "answers": len(stats),
        "tokens": generated,
        "wall_s": round(wall, 2),
        "aggregate_tokens_per_s": round(generated / wall, 2),
        "cpu_s": round(cpu, 2),
        "tokens_per_cpu_s": round(generated / cpu, 2) if cpu > 0 else 0.0,
        "per_sequence_tokens_per_s": round(statistics.mean(g.tokens_per_s for g in stats), 2),
        "ttft_mean_s": round(statistics.mean(g.ttft_s for g in stats), 3),
    }


def prefix_reuse(path: Path, threads: int, tokens: int) -> dict[str, Any]:
    """Eight questions over the same passages, two at a time, on a fresh 8-slot engine."""
    from appliance.chat.batching import BatchedLlamaCppChatModel
    from appliance.core.protocols import GenerationParams

    params = GenerationParams(max_tokens=tokens, temperature=0.0)
    with BatchedLlamaCppChatModel(path, slots=8, n_ctx=4096, n_threads=threads) as model:
        ttft: list[float] = []
        lock = threading.Lock()

        def ask(question: str) -> None:
            _, generation = model.complete(_messages(question, PASSAGES), params)
            with lock:
                ttft.append(generation.ttft_s)

        # The first question fills the cache; the others arrive two at a time.
        ask(QUESTIONS[0])
        cold_ttft = ttft[0]
        for i in range(1, len(QUESTIONS), 2):
            pair = [threading.Thread(target=ask, args=(q,)) for q in QUESTIONS[i : i + 2]]
            for thread in pair:
                thread.start()
            for thread in pair:
                thread.join()
        stats = model.engine_stats()
    warm = ttft[1:]
    return {
        "questions": len(QUESTIONS),
        "prompt_tokens": stats.prompt_tokens,
        "reused_prompt_tokens": stats.reused_prompt_tokens,
        "prefilled_prompt_tokens": stats.prompt_tokens - stats.reused_prompt_tokens,
        "saved_share": ratio(stats.reused_prompt_tokens, stats.prompt_tokens),
        "copied_prefixes": stats.copied_prefixes,
        "ttft_cold_s": round(cold_ttft, 3),
        "ttft_warm_mean_s": round(statistics.mean(warm), 3),
        "ttft_warm_over_cold": ratio(statistics.mean(warm), cold_ttft),
    }


def host_prefix_cache(path: Path, threads: int, tokens: int) -> dict[str, Any]:
    """More passage sets than slots: each of the ``len(PASSAGES)`` passages is asked about on
    a 2-slot engine, then each again with another question, with the host-memory prefix cache
    on and off (``chat.prefix_cache_mb`` 0). Without it the second round finds the passages
    long gone from the slots and reads them again."""
    from appliance.chat.batching import BatchedLlamaCppChatModel
    from appliance.core.protocols import GenerationParams

    params = GenerationParams(max_tokens=tokens, temperature=0.0)
    out: dict[str, Any] = {"passage_sets": len(PASSAGES), "slots": 2}
    for name, cache in (("off", 0), ("on", None)):
        with BatchedLlamaCppChatModel(
            path, slots=2, n_ctx=2048, n_threads=threads, prefix_cache_bytes=cache
        ) as model:
            for question in ("What does this passage require?", "Who is responsible here?"):
                for passage in PASSAGES:
                    model.complete(_messages(question, [passage]), params)
            stats = model.engine_stats()
        out[name] = {
            "prompt_tokens": stats.prompt_tokens,
            "prefilled_prompt_tokens": stats.prompt_tokens - stats.reused_prompt_tokens,
            "restored_prefixes": stats.restored_prefixes,
            "saved_mib": round(stats.saved_prefix_bytes / 2**20, 1),
        }
    out["prefilled_on_over_off"] = ratio(
        out["on"]["prefilled_prompt_tokens"], out["off"]["prefilled_prompt_tokens"]
    )
    return out


def kv_memory(path: Path, threads: int, n_ctx: int) -> dict[str, Any]:
    """The KV cache per slot as llama.cpp sizes it, and as resident memory grows with slots."""
    from appliance.chat.batching import BatchedLlamaCppChatModel

    grown = {}
    per_slot = 0
    for slots in (1, 8):
        before = _rss()
        with BatchedLlamaCppChatModel(path, slots=slots, n_ctx=n_ctx, n_threads=threads) as model:
            grown[slots] = _rss() - before
            per_slot = model.kv_bytes_per_slot
    return {
        "n_ctx_per_slot": n_ctx,
        "kv_mib_per_slot": round(per_slot / 2**20, 1),
        "rss_mib_1_slot": round(grown[1] / 2**20, 1),
        "rss_mib_8_slots": round(grown[8] / 2**20, 1),
        "rss_mib_per_added_slot": round((grown[8] - grown[1]) / 7 / 2**20, 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from appliance.chat.batching import BatchedLlamaCppChatModel
    from appliance.chat.llamacpp import LlamaCppChatModel
    from appliance.core.chat_settings import default_chat_model_path

    at_start = machine()
    path = args.model or default_chat_model_path()
    prompts = PROMPTS
    batched_rows: dict[int, list[dict]] = {c: [] for c in CONCURRENCY}
    serial_rows: list[dict] = []
    n_ctx = 1024
    with (
        BatchedLlamaCppChatModel(path, slots=8, n_ctx=n_ctx, n_threads=args.threads) as batched,
        LlamaCppChatModel(path, n_ctx=n_ctx, n_threads=args.threads) as serial,
    ):
        answer_all(batched, prompts[:2], 2, 8)  # warm-up: page in the weights
        for _ in range(args.rounds):
            serial_rows.append(answer_all(serial, prompts, 8, args.tokens))
            for c in CONCURRENCY:
                batched_rows[c].append(answer_all(batched, prompts, c, args.tokens))

    def median(rows: list[dict], key: str) -> float:
        return round(statistics.median(r[key] for r in rows), 2)

    table = [
        {
            "streams": c,
            "aggregate_tokens_per_s": median(batched_rows[c], "aggregate_tokens_per_s"),
            "per_sequence_tokens_per_s": median(batched_rows[c], "per_sequence_tokens_per_s"),
            "wall_s": median(batched_rows[c], "wall_s"),
            "tokens_per_cpu_s": median(batched_rows[c], "tokens_per_cpu_s"),
            "tokens": batched_rows[c][-1]["tokens"],
        }
        for c in CONCURRENCY
    ]
    serial_agg = median(serial_rows, "aggregate_tokens_per_s")
    one, eight = table[0], table[-1]
    return {
        "machine": at_start,
        "model": path.name,
        "threads": args.threads,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "prompts": len(prompts),
        "batched": table,
        "serial_8_threads": {
            "aggregate_tokens_per_s": serial_agg,
            "per_sequence_tokens_per_s": median(serial_rows, "per_sequence_tokens_per_s"),
            "wall_s": median(serial_rows, "wall_s"),
            "tokens_per_cpu_s": median(serial_rows, "tokens_per_cpu_s"),
        },
        "aggregate_8_over_1": ratio(eight["aggregate_tokens_per_s"], one["aggregate_tokens_per_s"]),
        "aggregate_8_over_serial": ratio(eight["aggregate_tokens_per_s"], serial_agg),
        "cpu_efficiency_8_over_1": ratio(eight["tokens_per_cpu_s"], one["tokens_per_cpu_s"]),
        "kv_cache": kv_memory(path, args.threads, 4096),
        "prefix_reuse": prefix_reuse(path, args.threads, min(args.tokens, 24)),
        "host_prefix_cache": host_prefix_cache(path, args.threads, min(args.tokens, 8)),
        "rounds_raw": {"serial": serial_rows, "batched": batched_rows},
    }


def print_report(r: dict[str, Any]) -> None:
    print(
        f"Continuous batching, {r['model']}: {r['prompts']} prompts, greedy, at most "
        f"{r['tokens']} tokens each, {r['threads']} threads, median of {r['rounds']} rounds"
    )
    print("  streams  aggregate tok/s  per-sequence tok/s  tokens per CPU s  wall s")
    for row in r["batched"]:
        print(
            f"  {row['streams']:7d}  {row['aggregate_tokens_per_s']:15.1f}  "
            f"{row['per_sequence_tokens_per_s']:18.1f}  {row['tokens_per_cpu_s']:16.1f}  "
            f"{row['wall_s']:6.1f}"
        )
    s = r["serial_8_threads"]
    print(
        f"  serial engine (chat.parallel: 1), 8 threads: {s['aggregate_tokens_per_s']:.1f} "
        f"tok/s aggregate, {s['per_sequence_tokens_per_s']:.1f} per sequence, "
        f"{s['wall_s']:.1f} s"
    )
    print(f"  aggregate, 8 streams / 1 stream (batched engine): {r['aggregate_8_over_1']}")
    print(f"  aggregate, 8 streams batched / serial engine:     {r['aggregate_8_over_serial']}")
    print(f"  tokens per CPU second, 8 streams / 1 stream:      {r['cpu_efficiency_8_over_1']}")
    kv = r["kv_cache"]
    print(
        f"  KV cache: {kv['kv_mib_per_slot']} MiB per slot of {kv['n_ctx_per_slot']} tokens "
        f"(f16); resident memory +{kv['rss_mib_per_added_slot']} MiB per added slot "
        f"(1 slot +{kv['rss_mib_1_slot']} MiB, 8 slots +{kv['rss_mib_8_slots']} MiB)"
    )
    p = r["prefix_reuse"]
    print(
        f"  prefix reuse, {p['questions']} questions over the same passages: "
        f"{p['reused_prompt_tokens']} of {p['prompt_tokens']} prompt tokens from the cache "
        f"({p['saved_share']}), {p['copied_prefixes']} copied from a busy slot; time to first "
        f"token cold {p['ttft_cold_s']} s, warm {p['ttft_warm_mean_s']} s "
        f"(ratio {p['ttft_warm_over_cold']})"
    )
    h = r["host_prefix_cache"]
    print(
        f"  host-memory prefix cache, {h['passage_sets']} passage sets on {h['slots']} slots, "
        f"each asked twice: prompt tokens prefilled {h['on']['prefilled_prompt_tokens']} with "
        f"it, {h['off']['prefilled_prompt_tokens']} without (ratio "
        f"{h['prefilled_on_over_off']}); {h['on']['restored_prefixes']} caches put back, "
        f"{h['on']['saved_mib']} MiB kept"
    )
    print(f"  {load_note(r['machine'])}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="answer tokens at most")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every engine")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--model", type=Path, help="a GGUF to measure (default: the shipped chat model)"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    quiet_libraries()
    if args.tokens < 1 or args.rounds < 1 or args.threads < 1:
        print("--tokens, --rounds and --threads must be positive", file=sys.stderr)
        return 2
    try:
        result = run(args)
    except ApplianceError as exc:
        print(f"batching_throughput: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print_json(result)
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
