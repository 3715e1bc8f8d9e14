"""The numeric format a run trains in, chosen by measuring the machine it runs on.

Why measure: QLoRA's NF4 base computes in bf16, which CPUs without AVX-512 BF16 (or AMX) emulate.
On a 2-core AVX2-only EPYC that made the default ten times slower than plain LoRA in fp32
(issue 11), while on a Zen 4 with ``avx512_bf16`` the two are close. Neither flags nor rules of
thumb predict that reliably (bitsandbytes' CPU kernels, oneDNN and torch each dispatch on their
own), so ``run.quantization: auto`` times the candidates instead:

    candidates(device)          nf4-bf16, nf4-fp32, lora-fp32 (CPU) | lora-bf16 (CUDA)
       │  plan()                 memory filter: weights + activations x headroom vs free memory
       ▼
    decide(trials, measure)     measure(p): load, one warm-up step, one timed step
       │                        (forward + backward on the run's first batch)
       ▼
    Decision                    to_json: config.json "precision", result.json, --json, the UI

Memory decides only what may be tried: a candidate that does not fit is skipped with the
numbers; when none fits, the smallest is tried anyway (the estimate is deliberately
pessimistic). Among the measured candidates the fastest wins. ``nf4`` and ``none`` are obeyed
without measuring. This module holds the decision and its bookkeeping; loading and stepping a
model is the caller's ``measure`` (``finetune.train``), so the choice is testable without one.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from appliance.core.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

MIB = 1 << 20
HEADROOM = 1.25
"""Multiplies the estimate: allocator slack, fragmentation, a second copy during loading."""
RESERVE_BYTES = 512 * MIB
"""Added to every estimate: the interpreter, torch's own buffers, the tokenizer, the data."""
QUANTIZED_BYTES_PER_PARAM = 0.5 + 4 / 64 / 4
"""NF4: 4 bits a weight plus the (double-quantized) absmax of each block of 64."""


@dataclass(frozen=True)
class Precision:
    """One way to hold the base and compute: quantized to NF4 or not, and the compute dtype."""

    name: str
    quantize: bool
    compute_dtype: Literal["bfloat16", "float32"]

    def mode(self, device: str) -> str:
        """The run's ``mode`` label (RunResult.mode): qlora-nf4 | qlora-nf4-fp32 | lora-fp32 on
        the CPU, with ``-cuda`` (and lora-bf16) on CUDA."""
        if self.quantize:
            base = "qlora-nf4" if self.compute_dtype == "bfloat16" else "qlora-nf4-fp32"
        else:
            base = f"lora-{'bf16' if self.compute_dtype == 'bfloat16' else 'fp32'}"
        return f"{base}-cuda" if device == "cuda" else base


NF4_BF16 = Precision("nf4-bf16", True, "bfloat16")
NF4_FP32 = Precision("nf4-fp32", True, "float32")
LORA_FP32 = Precision("lora-fp32", False, "float32")
LORA_BF16 = Precision("lora-bf16", False, "bfloat16")
_BY_NAME = {p.name: p for p in (NF4_BF16, NF4_FP32, LORA_FP32, LORA_BF16)}


def by_name(name: str) -> Precision:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(
            f"unknown precision {name!r}; known: {', '.join(sorted(_BY_NAME))}"
        ) from None


def candidates(device: str) -> tuple[Precision, ...]:
    """What ``auto`` may pick on ``device``: plain LoRA is fp32 on a CPU (bf16 there is the
    very emulation problem) and bf16 on a GPU (half the memory, tensor cores)."""
    return (NF4_BF16, NF4_FP32, LORA_BF16 if device == "cuda" else LORA_FP32)


def explicit(quantization: str, device: str) -> Precision:
    """The precision an explicit ``run.quantization`` names (``nf4``: QLoRA's bf16 compute)."""
    if quantization == "nf4":
        return NF4_BF16
    if quantization == "none":
        return LORA_BF16 if device == "cuda" else LORA_FP32
    raise ConfigError(
        f"run.quantization {quantization!r} is chosen by measurement, not named; "
        "use finetune.train, which measures it"
    )


# --- memory ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs, read from the base folder without loading weights."""

    quantizable_params: int
    """2-D weights outside the embeddings and the head: what bitsandbytes turns into NF4."""
    other_params: int
    hidden_size: int = 0
    layers: int = 0
    vocab_size: int = 0

    @property
    def params(self) -> int:
        return self.quantizable_params + self.other_params


_KEEP_FULL = ("embed", "lm_head", "wte", "wpe")


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header (8 bytes of length, then JSON): no weights read."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def model_shape(base: Path) -> ModelShape:
    quantizable = other = 0
    for path in sorted(Path(base).glob("*.safetensors")):
        for name, shape in _safetensors_shapes(path).items():
            count = 1
            for size in shape:
                count *= size
            if len(shape) == 2 and not any(key in name for key in _KEEP_FULL):
                quantizable += count
            else:
                other += count
    try:
        config = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    return ModelShape(
        quantizable_params=quantizable,
        other_params=other,
        hidden_size=int(config.get("hidden_size") or 0),
        layers=int(config.get("num_hidden_layers") or 0),
        vocab_size=int(config.get("vocab_size") or 0),
    )


def memory_needed(shape: ModelShape, precision: Precision, batch_size: int, seq_len: int) -> int:
    """Bytes a training run in ``precision`` needs, pessimistically.

    Weights: NF4 packs the projections and keeps the rest in fp32 (peft's k-bit preparation
    casts it up); plain LoRA holds everything in the compute dtype. Activations: the logits
    (fp32, with their softmax and gradient: three copies) dominate small models with large
    vocabularies; gradient checkpointing keeps one hidden state per layer.
    """
    act_bytes = 2 if precision.compute_dtype == "bfloat16" else 4
    if precision.quantize:
        weights = shape.quantizable_params * QUANTIZED_BYTES_PER_PARAM + shape.other_params * 4
    else:
        weights = shape.params * act_bytes
    tokens = batch_size * seq_len
    activations = tokens * shape.vocab_size * 4 * 3 + tokens * shape.hidden_size * shape.layers * (
        act_bytes * 4
    )
    return int((weights + activations) * HEADROOM + RESERVE_BYTES)


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (systemd's MemoryMax), if any."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < (1 << 60):  # "max" or a huge number: no limit
            return max(0, int(limit) - usage)
    return None


def free_memory(device: str) -> int | None:
    """Free bytes on ``device`` (None: unknown, every candidate is tried). CPU: MemAvailable,
    capped by a cgroup limit; CUDA: the driver's free memory on the current device."""
    if device == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free)
    available: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        available = None
    if available is None and hasattr(os, "sysconf"):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            available = None
    room = _cgroup_room()
    if room is not None:
        available = room if available is None else min(available, room)
    return available


# --- the decision ---------------------------------------------------------------------------------


@dataclass
class Trial:
    """One candidate: whether it may be tried, and what measuring it gave."""

    precision: Precision
    need_bytes: int
    fits: bool
    skipped: str | None = None
    """Why it was not measured (does not fit, bitsandbytes unusable); None when it was tried."""
    load_s: float | None = None
    warmup_s: float | None = None
    step_s: float | None = None
    """The timed forward and backward step, after one warm-up step."""
    error: str | None = None
    """The measurement failed (out of memory, an unsupported dtype): it cannot be chosen."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["precision"], data["need_bytes"]
        return {
            "name": self.precision.name,
            "quantize": self.precision.quantize,
            "compute_dtype": self.precision.compute_dtype,
            "need_mb": round(self.need_bytes / MIB),
            **data,
        }


@dataclass
class Decision:
    """What a run trains in and why; ``config.json``'s ``precision``."""

    requested: str
    chosen: Precision
    device: str
    reason: str
    trials: list[Trial] = field(default_factory=list)
    free_mb: int | None = None
    batch_tokens: int | None = None
    probe_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "chosen": self.chosen.name,
            "mode": self.chosen.mode(self.device),
            "device": self.device,
            "reason": self.reason,
            "free_mb": self.free_mb,
            "batch_tokens": self.batch_tokens,
            "probe_s": self.probe_s,
            "candidates": [t.to_json() for t in self.trials],
        }


def plan(
    options: Sequence[Precision],
    shape: ModelShape,
    free_bytes: int | None,
    batch_size: int,
    seq_len: int,
    unavailable: Mapping[str, str] | None = None,
) -> list[Trial]:
    """A trial per option, those that cannot be tried marked ``skipped`` with the reason.

    ``unavailable`` maps a precision name to why it cannot run here at all (no NF4 backend).
    When nothing that is available fits, the one needing least is tried anyway: the estimate
    is pessimistic, and a run that might fit is better than none.
    """
    unavailable = unavailable or {}
    trials = []
    for option in options:
        need = memory_needed(shape, option, batch_size, seq_len)
        fits = free_bytes is None or need <= free_bytes
        trial = Trial(option, need, fits)
        if option.name in unavailable:
            trial.skipped = unavailable[option.name]
        elif not fits:
            assert free_bytes is not None
            trial.skipped = f"needs about {need / MIB:.0f} MiB, {free_bytes / MIB:.0f} MiB free"
        trials.append(trial)
    available = [t for t in trials if t.precision.name not in unavailable]
    if available and not any(t.skipped is None for t in available):
        smallest = min(available, key=lambda t: t.need_bytes)
        log.warning(
            "no precision fits the free memory by the estimate (%s); trying %s anyway",
            smallest.skipped,
            smallest.precision.name,
        )
        smallest.skipped = None
    return trials


def choose(trials: Sequence[Trial]) -> Trial:
    """The fastest measured trial (the first listed on a tie)."""
    measured = [t for t in trials if t.step_s is not None and t.error is None]
    if not measured:
        problems = "; ".join(
            f"{t.precision.name}: {t.error or t.skipped or 'not measured'}" for t in trials
        )
        raise ModelError(f"no precision could run a training step here ({problems})")
    return min(measured, key=lambda t: t.step_s or 0.0)


Measure = Callable[[Precision], tuple[float, float, float]]
"""Loads the model in a precision and returns (load seconds, warm-up step, timed step)."""


def decide(
    trials: list[Trial],
    measure: Measure,
    *,
    device: str,
    free_bytes: int | None = None,
    batch_tokens: int | None = None,
    say: Callable[[str], None] | None = None,
) -> Decision:
    """Measure every trial that may be tried, in order, and pick the fastest."""
    import time

    start = time.perf_counter()
    for trial in trials:
        if trial.skipped is not None:
            continue
        try:
            trial.load_s, trial.warmup_s, trial.step_s = (
                round(v, 3) for v in measure(trial.precision)
            )
        except Exception as exc:  # out of memory, an unsupported dtype: not a candidate
            log.warning("precision %s failed its trial step: %s", trial.precision.name, exc)
            trial.error = f"{type(exc).__name__}: {exc}"[:300]
            continue
        if say is not None:
            say(f"precision {trial.precision.name}: {trial.step_s:.2f} s a step")
    best = choose(trials)
    measured = sum(1 for t in trials if t.step_s is not None and t.error is None)
    return Decision(
        requested="auto",
        chosen=best.precision,
        device=device,
        reason=f"fastest of {measured} measured candidate{'' if measured == 1 else 's'}",
        trials=trials,
        free_mb=None if free_bytes is None else round(free_bytes / MIB),
        batch_tokens=batch_tokens,
        probe_s=round(time.perf_counter() - start, 2),
    )


def summary(record: Mapping[str, Any] | None) -> str:
    """One line for people: the choice and each candidate's step time or why it was skipped."""
    if not record:
        return ""
    parts = []
    for c in record.get("candidates") or []:
        if c.get("step_s") is not None:
            parts.append(f"{c['name']} {c['step_s']:.2f} s/step")
        else:
            parts.append(f"{c['name']} skipped ({c.get('error') or c.get('skipped')})")
    head = f"precision {record.get('chosen')} ({record.get('reason')})"
    return head + (": " + ", ".join(parts) if parts else "")
