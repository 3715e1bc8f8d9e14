"""The whole adaptation chain, timed, and whether it taught anything (issue 11's figures).

As an admin runs it, in child processes of the real CLI on a fresh data folder:

    appliance dataset build --from pairs.jsonl --out format       36 format-teaching records
    appliance finetune --dataset format --config run.yaml --max-steps N
        (precision chosen as the config says: auto by default; train, merge, GGUF f16,
         quantize, load and ask in llama.cpp, gate against the base, register, activate)

then the base GGUF and the activated GGUF answer 16 unseen questions in llama.cpp (CPU), and
format adherence (the answer ends with ``Source: <file>``) is counted for each, as
``tests/finetune/test_end_to_end.py`` does. The data and the recipe are the project's own
(``tests/finetune/format_data.py``).

It prints the seconds per training step, the precision chosen and its probe timings, each
stage's time (from the run's state history), the end-to-end time and the adherence.
``benchmarks/finetune_gpu.sh`` runs it with ``--require-cuda --quantization nf4`` on a CUDA
machine.

    .venv/bin/python benchmarks/finetune_end_to_end.py [--steps 100] [--quantization auto]
        [--work DIR] [--require-cuda] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import load_note, machine, print_json, quiet_libraries, setup_logging

ROOT = Path(__file__).resolve().parents[1]
RECORDS, RECORDS_SEED = 36, 1
UNSEEN, UNSEEN_SEED = 16, 12345


def _appliance(data: Path, work: Path, *args: str) -> tuple[dict[str, Any], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-m", "appliance.cli", "--data-dir", str(data), *args, "--json"]
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode not in (0, 4):  # 4: trained and registered, but the gate rejected it
        raise SystemExit(
            f"`appliance {' '.join(args)}` failed ({done.returncode}):\n{done.stderr[-4000:]}"
        )
    return json.loads(done.stdout), seconds


def _stage_seconds(state: dict[str, Any]) -> dict[str, float]:
    """Seconds spent in each status of the run, from its state history."""
    history = state.get("history") or []
    out: dict[str, float] = {}
    for this, following in itertools.pairwise(history):
        out[this["status"]] = round(
            out.get(this["status"], 0.0) + following["time"] - this["time"], 1
        )
    return out


def _adherence(gguf: Path, unseen: list[dict[str, Any]]) -> float:
    from appliance.chat.llamacpp import LlamaCppChatModel
    from appliance.core.protocols import GenerationParams
    from tests.finetune.format_data import adherence

    params = GenerationParams(max_tokens=80, temperature=0.0, seed=0)
    with LlamaCppChatModel(gguf, n_ctx=1024, n_threads=os.cpu_count() or 2, seed=0) as model:
        hits = [adherence(model.complete(r["messages"][:-1], params)[0], r["file"]) for r in unseen]
    return round(sum(hits) / len(hits), 3)


def run(work: Path, steps: int, quantization: str) -> dict[str, Any]:
    from tests.finetune.format_data import RUN_CONFIG, make_format_records

    data = work / "data"
    records = make_format_records(RECORDS, seed=RECORDS_SEED)
    (work / "pairs.jsonl").write_text(
        "".join(json.dumps({"messages": r["messages"]}) + "\n" for r in records), encoding="utf-8"
    )
    config = RUN_CONFIG.replace("save_every: 12", f"save_every: {max(1, steps // 2)}")
    (work / "run.yaml").write_text(f"{config}quantization: {quantization}\n", encoding="utf-8")
    start = time.perf_counter()
    dataset, dataset_s = _appliance(data, work, "dataset", "build", "--from", "pairs.jsonl",
                                    "--out", "format")  # fmt: skip
    final, finetune_s = _appliance(data, work, "finetune", "--dataset", "format", "--config",
                                   "run.yaml", "--max-steps", str(steps))  # fmt: skip
    end_to_end = time.perf_counter() - start
    run_dir = data / "finetune" / "runs" / final["run"]
    state = json.loads((run_dir / "state.json").read_text(encoding="utf-8"))
    loss = [json.loads(x) for x in (run_dir / "loss.jsonl").read_text().splitlines() if x]
    sft = [r for r in loss if r.get("phase", "sft") == "sft"]
    train = final["train"]
    models = {m["version"]: m for m in _appliance(data, work, "models", "list")[0]}
    unseen = make_format_records(UNSEEN, seed=UNSEEN_SEED)
    rates = {
        "base": _adherence(Path(models["base"]["gguf"]), unseen),
        "tuned": _adherence(Path(models[final["version"]]["gguf"]), unseen),
    }
    return {
        "steps": train["steps"],
        "device": train["device"],
        "mode": train["mode"],
        "precision": final.get("precision"),
        "s_per_step": round(sft[-1]["elapsed"] / len(sft), 3),
        "train_tokens_per_s": train["tokens_per_s"],
        "final_loss": train["final_loss"],
        "dataset": {"train": dataset["train"], "heldout": dataset["heldout"]},
        "status": final["status"],
        "version": final["version"],
        "gate": (final.get("gate") or {}).get("passed"),
        "seconds": {
            "dataset_build": round(dataset_s, 1),
            "finetune_command": round(finetune_s, 1),
            **{f"stage_{k}": v for k, v in _stage_seconds(state).items()},
            "end_to_end": round(end_to_end, 1),
        },
        "adherence": rates,
        "unseen_questions": UNSEEN,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps")
    parser.add_argument("--quantization", choices=("auto", "nf4", "none"), default="auto")
    parser.add_argument("--work", type=Path, help="keep the data folder here (default: a temp)")
    parser.add_argument(
        "--require-cuda", action="store_true", help="refuse to run where torch sees no CUDA"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    quiet_libraries()
    sys.path.insert(0, str(ROOT))
    if args.require_cuda:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--require-cuda: torch sees no CUDA device here")
    at_start = machine()
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=False)
        report = run(args.work, args.steps, args.quantization)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
            report = run(Path(tmp), args.steps, args.quantization)
    report["machine"] = at_start
    report["note"] = load_note(at_start)
    if args.json:
        print_json(report)
        return 0
    from finetune.precision import summary

    seconds = report["seconds"]
    print(f"{report['steps']} steps on {report['device']} in {report['mode']}: "
          f"{report['s_per_step']} s/step, {report['train_tokens_per_s']} tokens/s, "
          f"final loss {report['final_loss']:.4f}")  # fmt: skip
    print(summary(report["precision"]))
    print("seconds: " + ", ".join(f"{k} {v}" for k, v in seconds.items()))
    print(f"end to end (dataset build + finetune: train, export, gate, register): "
          f"{seconds['end_to_end']} s; {report['status']} {report['version']}")  # fmt: skip
    rates = report["adherence"]
    print(f"format adherence on {report['unseen_questions']} unseen questions: "
          f"base {rates['base']:.2f} -> fine-tuned {rates['tuned']:.2f}")  # fmt: skip
    print(report["note"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
