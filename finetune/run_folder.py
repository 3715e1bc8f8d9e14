"""The files of a fine-tuning run folder, written and read here::

    config.json        resolved RunConfig, base folder (and its digest), dataset folder and sha256
    versions.json      torch / transformers / peft / bitsandbytes / python versions, device
    progress.json      status running|stopped|done|failed, step, loss, speeds; rewritten
                       atomically every step so a UI can poll it
    loss.jsonl         one record per optimizer step: step, loss, lr, tokens, elapsed (, phase)
    loss.png           the loss curve (finetune.curves)
    checkpoints/step-N/  adapter (safetensors), optimizer, scheduler, RNG and data position;
                       the newest ``keep_checkpoints`` are kept
    adapter/           the final adapter, safetensors only
    result.json        the RunResult

``finetune.train`` writes them; ``finetune.runs`` adds its own bookkeeping (``RUN_BOOKKEEPING``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RUN_BOOKKEEPING = frozenset({"request.json", "state.json", "state.json.tmp", "run.log", "stop"})
"""Files of ``finetune.runs`` (request, state, log, stop) that may be in a run folder before
training starts."""


@dataclass
class RunResult:
    """What a run produced; ``result.json`` of a run holds it."""

    run_dir: Path
    adapter_dir: Path | None
    base_dir: Path
    steps: int
    final_loss: float | None
    train_tokens: int
    tokens_per_s: float
    peak_rss_mb: float
    mode: str
    """qlora-nf4 | qlora-nf4-fp32 | lora-fp32 (CPU); the same with -cuda, and lora-bf16-cuda
    (CUDA): ``finetune.precision.Precision.mode``."""
    device: str
    fallback_reason: str | None
    status: str = "done"
    """done | stopped (resume continues it)."""
    max_steps: int = 0
    skipped_examples: int = 0
    """Training records that could not fit ``max_seq_len`` with any assistant token."""
    dpo_steps: int = 0
    dpo_final_loss: float | None = None
    precision: dict[str, Any] | None = None
    """How the precision was chosen: ``finetune.precision.Decision.to_json`` (timings too)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("run_dir", "adapter_dir", "base_dir"):
            data[key] = None if data[key] is None else str(data[key])
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunResult:
        values = dict(data)
        for key in ("run_dir", "base_dir"):
            values[key] = Path(values[key])
        if values.get("adapter_dir") is not None:
            values["adapter_dir"] = Path(values["adapter_dir"])
        return cls(**values)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def base_digest(base: Path) -> str:
    digest = hashlib.sha256()
    for path in [*sorted(base.glob("*.safetensors")), base / "config.json"]:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def versions(device: str) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out["device"] = device
    if device == "cuda":
        import torch

        out["gpu"] = torch.cuda.get_device_name(0)
    out["cpus"] = os.cpu_count()
    return out


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in (run_dir / "checkpoints").glob("step-*"):
        suffix = path.name.removeprefix("step-")
        if suffix.isdigit() and (path / "state.json").is_file():
            found.append((int(suffix), path))
    return sorted(found)


def iter_loss_records(run_dir: Path) -> Iterator[dict[str, Any]]:
    """The records of a run's ``loss.jsonl`` (for UIs and reports)."""
    from finetune.curves import read_loss_log

    yield from read_loss_log(Path(run_dir) / "loss.jsonl")
