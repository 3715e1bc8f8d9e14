"""GGUF quantization: file size and decode speed of the default model at f16 and Q4_K_M.

The packaged SmolLM2-135M (Q4_1) is dequantized to an fp32 Hugging Face folder (the fine-tuning
base, cached by its hash), converted to an f16 GGUF with llama.cpp's converter, and quantized
to Q4_K_M, all in this process, as ``finetune.export`` does for a fine-tuned model. Both files
then decode the same prompt in llama-cpp-python: greedy, the same thread count, a fixed number
of tokens (end-of-text does not stop it), after one warm-up run.

    python benchmarks/gguf_quantization.py [--tokens N] [--threads N] [--qtype Q4_K_M]
        [--base-cache DIR] [--data-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import (
    data_folder,
    load_note,
    machine,
    print_json,
    quiet_libraries,
    ratio,
    setup_logging,
)

from appliance.core.errors import ApplianceError

PROMPT = (
    "<|im_start|>user\nExplain in a few sentences why audit logs are kept for several years."
    "<|im_end|>\n<|im_start|>assistant\n"
)


def decode_rate(gguf: Path, tokens: int, threads: int) -> dict[str, Any]:
    """Tokens/s of greedy decoding of ``tokens`` tokens after the prompt (best of two runs)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=max(512, tokens + 128),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    try:
        prompt = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
        best = 0.0
        for _ in range(2):  # the first run also warms the caches
            llm.reset()
            llm.eval(prompt)
            start = time.perf_counter()
            for _ in range(tokens):
                token = llm.sample(top_k=1, temp=0.0)
                llm.eval([token])
            best = max(best, tokens / (time.perf_counter() - start))
        return {"tokens": tokens, "tokens_per_s": round(best, 2)}
    finally:
        llm.close()


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from appliance.core.chat_settings import default_chat_model_path
    from finetune.base_model import ensure_hf_base
    from finetune.export import convert_to_gguf, quantize_gguf

    at_start = machine()
    started = time.perf_counter()
    base = ensure_hf_base(default_chat_model_path(), args.base_cache or root / "base")
    dequantize_s = time.perf_counter() - started

    started = time.perf_counter()
    f16 = convert_to_gguf(base, root / "model-f16.gguf", "f16")
    convert_s = time.perf_counter() - started
    started = time.perf_counter()
    quant = quantize_gguf(
        f16, root / f"model-{args.qtype}.gguf", args.qtype, n_threads=args.threads
    )
    quantize_s = time.perf_counter() - started

    rows = []
    for name, path in (("F16", f16), (args.qtype, quant)):
        rows.append(
            {
                "type": name,
                "bytes": path.stat().st_size,
                "mib": round(path.stat().st_size / 2**20, 1),
                **decode_rate(path, args.tokens, args.threads),
            }
        )
    return {
        "machine": at_start,
        "threads": args.threads,
        "tokens": args.tokens,
        "dequantize_s": round(dequantize_s, 2),
        "convert_f16_s": round(convert_s, 2),
        "quantize_s": round(quantize_s, 2),
        "files": rows,
        "size_ratio": ratio(rows[1]["bytes"], rows[0]["bytes"]),
        "speed_ratio": ratio(rows[1]["tokens_per_s"], rows[0]["tokens_per_s"]),
    }


def print_report(r: dict[str, Any]) -> None:
    print(
        f"GGUF quantization of SmolLM2-135M: greedy decode of {r['tokens']} tokens, "
        f"{r['threads']} threads, best of 2"
    )
    for row in r["files"]:
        print(f"  {row['type']:8s} {row['mib']:8.1f} MiB  {row['tokens_per_s']:8.1f} tokens/s")
    print(f"  size  {r['files'][1]['type']}/F16 = {r['size_ratio']}")
    print(f"  speed {r['files'][1]['type']}/F16 = {r['speed_ratio']}")
    print(
        f"  (dequantize {r['dequantize_s']} s, convert to f16 {r['convert_f16_s']} s, "
        f"quantize {r['quantize_s']} s)"
    )
    print(f"  {load_note(r['machine'])}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="decoded tokens per run")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--qtype", default="Q4_K_M", help="the quantization to compare with f16")
    parser.add_argument(
        "--base-cache",
        type=Path,
        help="folder caching the dequantized base (default: inside the data folder)",
    )
    parser.add_argument("--data-dir", type=Path, help="keep the GGUF files here")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    quiet_libraries()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.tokens < 1 or args.threads < 1:
        print("--tokens and --threads must be positive", file=sys.stderr)
        return 2
    try:
        with data_folder(args.data_dir, "gguf-quantization-") as root:
            result = run(args, root)
    except ApplianceError as exc:
        print(f"gguf_quantization: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print_json(result)
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
