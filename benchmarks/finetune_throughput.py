"""Fine-tuning speed: which precision trains fastest on this CPU, and what ``auto`` picks.

The default report (issue 11) prints the CPU model and the flags that decide bf16 speed
(avx2, avx512f, avx512_bf16, amx), then for each class of CPU measured:

    candidates   each precision of ``finetune.precision.candidates`` (NF4 with bf16 compute, NF4
                 with fp32 compute, plain LoRA in fp32) loaded by ``finetune.modeling.load_model``
                 and stepped ``--steps`` times after one warm-up step on the same batches: the
                 seconds per optimizer step of each
    auto         ``finetune.train.train`` with ``quantization: auto`` for ``--steps`` steps: the
                 probe's timings, its choice, the probe's cost and the run's seconds per step

and the headlines

    auto s/step / fastest candidate s/step      (goal: at most 1.10)
    nf4-bf16 s/step / auto s/step               (today's default against auto; goal on a CPU
                                                 without native bf16: at least 5)

``--isa avx2`` (or ``both``) emulates the AVX2-only class of CPU on a machine with AVX-512: the
children start with ``ATEN_CPU_CAPABILITY=avx2`` (torch's own vectorized kernels) and
``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN's GEMMs and convolutions) set before torch is imported. Each
child also times a bf16 and an fp32 matrix product, and reports torch's CPU capability, so the
report shows whether the cap took effect. bitsandbytes' own CPU kernels do not read these
variables; the report says so beside the emulated row.

``--loop-overhead`` gives the earlier report instead: ``train()``'s tokens/s against a bare peft
loop on the same load, batches and optimizer (goal: at least 0.9), ``--rounds`` times.

Every phase runs in its own child process (multiprocessing "spawn"): a process's RSS high-water
mark only grows, and the ISA variables must be set before torch loads. The children run one
after the other, never together, so they do not compete for the CPU.

    .venv/bin/python benchmarks/finetune_throughput.py [--isa native|avx2|both] [--steps N]
        [--records N] [--batch-size N] [--max-seq-len N] [--cache-dir DIR] [--json]
    .venv/bin/python benchmarks/finetune_throughput.py --loop-overhead [--rounds N]
        [--quantization auto|nf4|none]

A 2-core machine shared with other work changes speed by tens of percent from minute to minute:
read the load note, and compare figures measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import load_note, machine, print_json, quiet_libraries, ratio, setup_logging

GOAL = 0.9
AUTO_GOAL = 1.10
SPEEDUP_GOAL = 5.0
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
ISA_ENV = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
ROOT = Path(__file__).resolve().parents[1]


def _dataset(folder: Path, records: int) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.finetune.format_data import make_format_records

    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(
        json.dumps({"messages": r["messages"]}) + "\n" for r in make_format_records(records, 1)
    )
    (folder / "train.jsonl").write_text(lines, encoding="utf-8")
    return folder


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _phase_train(base: str, dataset: str, config_json: str, out: str) -> dict[str, Any]:
    from finetune.config import RunConfig
    from finetune.train import train

    config = RunConfig.model_validate_json(config_json)
    start = time.perf_counter()
    result = train(Path(out) / "run", Path(dataset), config, base=Path(base), progress=False)
    wall = time.perf_counter() - start
    records = [
        json.loads(line) for line in (Path(out) / "run" / "loss.jsonl").read_text().splitlines()
    ]
    step_s = records[-1]["elapsed"]
    return {
        "mode": result.mode,
        "steps": result.steps,
        "train_tokens": result.train_tokens,
        "train_s": round(step_s, 2),
        "tokens_per_s": round(result.train_tokens / step_s, 2),
        "overhead_s": round(wall - step_s, 2),
        "final_loss": result.final_loss,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _phase_bare(base: str, dataset: str, config_json: str, out: str) -> dict[str, Any]:
    """The minimal loop: the same load, batches and optimizer, nothing else."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from finetune.batches import batch_indices, collate, load_sft_examples
    from finetune.config import RunConfig
    from finetune.modeling import load_model

    config = RunConfig.model_validate_json(config_json)
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    loaded = load_model(Path(base), config, "cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    examples, _ = load_sft_examples(tokenizer, Path(dataset), config.max_seq_len)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.resolved_warmup, config.max_steps)
    load_s = time.perf_counter() - start
    tokens, step_s, loss = 0, 0.0, float("nan")
    model.train()
    for step in range(1, config.max_steps + 1):
        t0 = time.perf_counter()
        for micro in range(config.grad_accum):
            indices = batch_indices(
                len(examples), config.seed, step, micro, config.grad_accum, config.batch_size
            )
            batch = collate([examples[i] for i in indices], tokenizer.pad_token_id)
            step_loss = model(**batch).loss / config.grad_accum
            step_loss.backward()
            loss = step_loss.item()
            tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_s += time.perf_counter() - t0
    return {
        "mode": loaded.mode,
        "steps": config.max_steps,
        "train_tokens": tokens,
        "train_s": round(step_s, 2),
        "tokens_per_s": round(tokens / step_s, 2),
        "load_s": round(load_s, 2),
        "final_loss": loss,
        "peak_rss_mb": _peak_rss_mb(),
    }


def cpu_info() -> dict[str, Any]:
    """The CPU's model name and the flags that decide how fast bf16 runs (Linux)."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "cpus": os.cpu_count(), "flags": {f: f in flags for f in CPU_FLAGS}}


def _isa_probe() -> dict[str, Any]:
    """What the cap did: torch's CPU capability and a bf16 and an fp32 matrix product."""
    import torch

    out: dict[str, Any] = {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(256, 576, dtype=dtype)
        b = torch.randn(576, 1536, dtype=dtype)
        a @ b  # warm-up (oneDNN JIT)
        t0 = time.perf_counter()
        for _ in range(20):
            a @ b
        out[f"matmul_{name}_ms"] = round((time.perf_counter() - t0) / 20 * 1000, 3)
    return out


def _phase_candidates(base: str, dataset: str, config_json: str, out: str) -> dict[str, Any]:
    """Every precision candidate, ``max_steps`` optimizer steps after one warm-up step."""
    import gc

    import torch

    from finetune.batches import batch_indices, collate, load_sft_examples
    from finetune.config import RunConfig
    from finetune.modeling import bnb_unavailable_reason, load_model, load_tokenizer
    from finetune.precision import candidates

    config = RunConfig.model_validate_json(config_json)
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    report: dict[str, Any] = {"isa": _isa_probe(), "candidates": {}}
    tokenizer = load_tokenizer(Path(base))
    examples, _ = load_sft_examples(tokenizer, Path(dataset), config.max_seq_len)
    nf4_problem = bnb_unavailable_reason("cpu")
    for precision in candidates("cpu"):
        if precision.quantize and nf4_problem:
            report["candidates"][precision.name] = {"skipped": nf4_problem}
            continue
        torch.manual_seed(config.seed)
        t0 = time.perf_counter()
        loaded = load_model(Path(base), config, "cpu", precision, tokenizer=tokenizer)
        model = loaded.model
        load_s = time.perf_counter() - t0
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
        model.train()
        times, tokens = [], 0
        for step in range(0, config.max_steps + 1):  # step 0: the warm-up, not counted
            indices = batch_indices(
                len(examples), config.seed, max(step, 1), 0, 1, config.batch_size
            )
            batch = collate([examples[i] for i in indices], tokenizer.pad_token_id)
            t0 = time.perf_counter()
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step:
                times.append(time.perf_counter() - t0)
                tokens += int(batch["attention_mask"].sum())
        report["candidates"][precision.name] = {
            "mode": loaded.mode,
            "load_s": round(load_s, 2),
            "step_s": round(sum(times) / len(times), 3),
            "steps": len(times),
            "tokens_per_s": round(tokens / sum(times), 2),
        }
        del loaded, model, params, optimizer
        gc.collect()
    report["peak_rss_mb"] = _peak_rss_mb()
    return report


def _phase_auto(base: str, dataset: str, config_json: str, out: str) -> dict[str, Any]:
    """``train()`` as a run does it, with ``quantization: auto``: the probe, then the steps."""
    from finetune.config import RunConfig
    from finetune.train import train

    config = RunConfig.model_validate_json(config_json)
    run = Path(out) / "run"
    start = time.perf_counter()
    result = train(run, Path(dataset), config, base=Path(base), progress=False)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    step_s = records[-1]["elapsed"]
    precision = json.loads((run / "config.json").read_text())["precision"]
    return {
        "isa": _isa_probe(),
        "mode": result.mode,
        "chosen": precision["chosen"],
        "probe": {c["name"]: c.get("step_s") for c in precision["candidates"]},
        "probe_s": precision["probe_s"],
        "steps": result.steps,
        "step_s": round(step_s / result.steps, 3),
        "tokens_per_s": round(result.train_tokens / step_s, 2),
        "wall_s": round(wall, 2),
        "peak_rss_mb": _peak_rss_mb(),
    }


PHASES = {
    "train": _phase_train,
    "bare": _phase_bare,
    "candidates": _phase_candidates,
    "auto": _phase_auto,
}


def _child(name: str, args: tuple[str, ...], queue: Any) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.path.insert(0, str(ROOT))
    try:
        queue.put(("ok", PHASES[name](*args)))
    except BaseException as exc:
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def run_phase(name: str, args: tuple[str, ...], isa: str = "native") -> dict[str, Any]:
    """``name`` in a fresh child process; ``isa`` sets its CPU-capability caps, which a spawned
    child inherits with the environment and reads when it first imports torch."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(name, args, queue), name=f"bench-{name}")
    saved = {key: os.environ.get(key) for key in ISA_ENV["avx2"]}
    os.environ.update(ISA_ENV[isa])
    try:
        process.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    status, payload = queue.get()
    process.join()
    if status != "ok":
        raise RuntimeError(f"the {name} phase failed: {payload}")
    return dict(payload)


def _loop_overhead(args: argparse.Namespace, base: Path, config: Any) -> dict[str, Any]:
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        dataset = _dataset(Path(tmp) / "dataset", args.records)
        common = (str(base), str(dataset), config.model_dump_json())
        for number in range(max(1, args.rounds)):
            # Alternating the order spreads a drift in the machine's load over both phases.
            order = ("train", "bare") if number % 2 == 0 else ("bare", "train")
            phases = {}
            for name in order:
                out = Path(tmp) / f"round-{number}-{name}"
                out.mkdir()
                phases[name] = run_phase(name, (*common, str(out)))
            rounds.append(
                {
                    "train": phases["train"],
                    "bare_peft": phases["bare"],
                    "ratio": ratio(phases["train"]["tokens_per_s"], phases["bare"]["tokens_per_s"]),
                }
            )
    median = sorted(rounds, key=lambda r: r["ratio"] or 0.0)[len(rounds) // 2]
    return {
        "train": median["train"],
        "bare_peft": median["bare_peft"],
        "ratio": median["ratio"],
        "rounds": rounds,
        "goal": GOAL,
    }


def _progress(isa: str, phase: str, result: dict[str, Any]) -> None:
    """A line per finished phase on stderr: a long run shows what it has, even if cut short."""
    if phase == "candidates":
        steps = {k: v.get("step_s") for k, v in result["candidates"].items()}
        text = f"isa {result['isa']}; s/step {steps}"
    else:
        text = f"chose {result['chosen']} (probe {result['probe']}); {result['step_s']} s/step"
    print(f"[{isa} {phase}] {text}", file=sys.stderr, flush=True)


def _precision_report(args: argparse.Namespace, base: Path, config: Any) -> dict[str, Any]:
    # The emulated class first: it is the one a default can be ten times wrong on.
    classes = ["avx2", "native"] if args.isa == "both" else [args.isa]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        dataset = _dataset(Path(tmp) / "dataset", args.records)
        common = (str(base), str(dataset), config.model_dump_json())
        for isa in classes:
            out = Path(tmp) / f"{isa}-candidates"
            out.mkdir()
            measured = run_phase("candidates", (*common, str(out)), isa)
            _progress(isa, "candidates", measured)
            out = Path(tmp) / f"{isa}-auto"
            out.mkdir()
            auto = run_phase("auto", (*common, str(out)), isa)
            _progress(isa, "auto", auto)
            steps = {
                name: c["step_s"] for name, c in measured["candidates"].items() if "step_s" in c
            }
            fastest = min(steps, key=lambda name: steps[name])
            rows.append(
                {
                    "isa": isa,
                    "emulated": isa != "native",
                    "env": ISA_ENV[isa],
                    "isa_probe": measured["isa"],
                    "candidates": measured["candidates"],
                    "fastest": fastest,
                    "auto": auto,
                    "auto_vs_fastest": ratio(auto["step_s"], steps[fastest]),
                    "nf4_bf16_vs_auto": ratio(steps.get("nf4-bf16", 0.0), auto["step_s"]),
                }
            )
    rows.sort(key=lambda row: row["emulated"])  # this CPU first
    return {"classes": rows, "goals": {"auto_vs_fastest": AUTO_GOAL, "speedup": SPEEDUP_GOAL}}


def _print_precision(report: dict[str, Any]) -> None:
    cpu = report["cpu"]
    flags = ", ".join(f"{name} {'yes' if on else 'no'}" for name, on in cpu["flags"].items())
    print(f"CPU: {cpu['model']}, {cpu['cpus']} CPUs; {flags}")
    for row in report["classes"]:
        probe = row["isa_probe"]
        label = "emulated AVX2 class" if row["emulated"] else "native"
        print(
            f"\n[{row['isa']}] {label}: torch CPU capability {probe['torch_cpu_capability']}, "
            f"matmul bf16 {probe['matmul_bf16_ms']} ms vs fp32 {probe['matmul_fp32_ms']} ms"
            + (f" ({' '.join(f'{k}={v}' for k, v in row['env'].items())})" if row["env"] else "")
        )
        for name, c in row["candidates"].items():
            if "step_s" in c:
                print(
                    f"  {name:>10}: {c['step_s']:.3f} s/step ({c['steps']} steps, "
                    f"{c['tokens_per_s']} tokens/s, load {c['load_s']} s)"
                )
            else:
                print(f"  {name:>10}: skipped ({c['skipped']})")
        auto = row["auto"]
        probe_line = ", ".join(
            f"{k} {v:.2f} s" if v is not None else f"{k} -" for k, v in auto["probe"].items()
        )
        print(
            f"  {'auto':>10}: chose {auto['chosen']} (probe {auto['probe_s']} s: {probe_line}); "
            f"{auto['step_s']:.3f} s/step over {auto['steps']} steps"
        )
        print(
            f"  auto / fastest ({row['fastest']}): {row['auto_vs_fastest']} "
            f"(goal: at most {AUTO_GOAL}); nf4-bf16 / auto: {row['nf4_bf16_vs_auto']}x "
            f"(goal without native bf16: at least {SPEEDUP_GOAL}x)"
        )
        if row["emulated"]:
            print(
                "  (emulated: torch and oneDNN are capped; bitsandbytes' own CPU kernels still "
                "see the real CPU)"
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per phase")
    parser.add_argument("--records", type=int, default=24, help="training records")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument(
        "--isa",
        choices=("native", "avx2", "both"),
        default="native",
        help="the CPU class: this CPU, the AVX2-only class emulated by capping torch and "
        "oneDNN, or both",
    )
    parser.add_argument(
        "--loop-overhead",
        action="store_true",
        help="the earlier report: train() against a bare peft loop (with --rounds, --quantization)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="--loop-overhead: pairs of phases, alternating which goes first; the median "
        "ratio is reported",
    )
    parser.add_argument("--quantization", choices=("auto", "nf4", "none"), default="nf4")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="where the dequantized base is kept"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    quiet_libraries()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    from appliance.core.chat_settings import default_chat_model_path
    from finetune.base_model import ensure_hf_base
    from finetune.config import load_run_config

    at_start = machine()
    cache = args.cache_dir or Path(tempfile.gettempdir()) / "appliance-finetune-bases"
    base = ensure_hf_base(default_chat_model_path(), cache)
    config = load_run_config(
        None,
        max_steps=args.steps,
        batch_size=args.batch_size,
        max_seq_len=args.max_seq_len,
        quantization=args.quantization if args.loop_overhead else "auto",
        save_every=10_000,  # a checkpoint only at the end, as a real run of this length would
    )
    report: dict[str, Any] = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "records": args.records,
        "cpu": cpu_info(),
    }
    if args.loop_overhead:
        report.update(_loop_overhead(args, base, config))
    else:
        report.update(_precision_report(args, base, config))
    report["machine"] = at_start
    report["note"] = load_note(at_start)
    if args.json:
        print_json(report)
        return 0
    if args.loop_overhead:
        for name in ("train", "bare_peft"):
            phase = report[name]
            print(
                f"{name:>10}: {phase['mode']}, {phase['steps']} steps, {phase['train_tokens']} "
                f"tokens in {phase['train_s']} s = {phase['tokens_per_s']} tokens/s, "
                f"peak RSS {phase['peak_rss_mb']} MB"
            )
        print(f"     ratio: {report['ratio']} (goal: at least {GOAL})")
    else:
        _print_precision(report)
    print(report["note"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
