"""Fine-tuning throughput: ``finetune.train.train`` against a bare peft loop on the same work.

Both phases train the real default model (the packaged SmolLM2 GGUF, dequantized once into a
cache folder) on the same synthetic chat records (``tests/finetune/format_data.py``) for
``--steps`` optimizer steps, with the same model load (``finetune.train.load_model``: NF4 QLoRA
where bitsandbytes can, the same LoRA config), the same batches (same tokenization and data
order), the same AdamW and schedule. The bare loop has none of the run's bookkeeping
(progress.json, loss.jsonl, checkpoints, the loss curve); the headline is

    train() training tokens/s / bare loop tokens/s     (the goal: at least 0.9)

Tokens are the non-padding tokens of the batches; the seconds are those of the optimizer steps
(model loading is excluded from both and reported apart).

Each phase runs in its own child process (multiprocessing "spawn"): a process's RSS high-water
mark (``ru_maxrss``) only ever grows, so measuring both phases in one process would report the
larger of the two for the second. The children are started one after the other, never
together, so they do not compete for the CPU.

    .venv/bin/python benchmarks/finetune_throughput.py [--steps N] [--records N]
        [--batch-size N] [--rounds N] [--quantization nf4|none] [--cache-dir DIR] [--json]

A 2-core machine shared with other work changes speed by tens of percent from minute to minute
(one run here measured 0.48 with another job competing, 1.04 right after on a quiet machine):
use ``--rounds 3`` (the median round is reported) and read the load note.
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

    from finetune.config import RunConfig
    from finetune.train import batch_indices, collate, load_model, load_sft_examples

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


def _child(name: str, args: tuple[str, ...], queue: Any) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.path.insert(0, str(ROOT))
    try:
        phase = _phase_train if name == "train" else _phase_bare
        queue.put(("ok", phase(*args)))
    except BaseException as exc:
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def run_phase(name: str, args: tuple[str, ...]) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(name, args, queue), name=f"bench-{name}")
    process.start()
    status, payload = queue.get()
    process.join()
    if status != "ok":
        raise RuntimeError(f"the {name} phase failed: {payload}")
    return dict(payload)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per phase")
    parser.add_argument("--records", type=int, default=24, help="training records")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="pairs of phases, alternating which goes first; the median ratio is reported",
    )
    parser.add_argument("--quantization", choices=("nf4", "none"), default="nf4")
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
    from appliance.chat_models import default_chat_model_path
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
        quantization=args.quantization,
        save_every=10_000,  # a checkpoint only at the end, as a real run of this length would
    )
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
    report = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "records": args.records,
        "train": median["train"],
        "bare_peft": median["bare_peft"],
        "ratio": median["ratio"],
        "rounds": rounds,
        "goal": GOAL,
        "machine": at_start,
        "note": load_note(at_start),
    }
    if args.json:
        print_json(report)
        return 0
    for name in ("train", "bare_peft"):
        phase = report[name]
        print(
            f"{name:>10}: {phase['mode']}, {phase['steps']} steps, {phase['train_tokens']} tokens "
            f"in {phase['train_s']} s = {phase['tokens_per_s']} tokens/s, "
            f"peak RSS {phase['peak_rss_mb']} MB"
        )
    print(f"     ratio: {report['ratio']} (goal: at least {GOAL})")
    print(report["note"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
