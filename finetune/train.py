"""Supervised fine-tuning (QLoRA or LoRA) and optional DPO, with our own loop on peft.

Why our own loop: trl's ``SFTTrainer`` took about twice as long per step as a bare peft loop on
the same batches here (docs/facts.md); the loop below is that bare loop plus bookkeeping
(``benchmarks/finetune_throughput.py`` measures the difference).

A run folder::

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

Loss is computed on assistant tokens only: every prefix of a conversation ending before an
assistant turn is rendered with the tokenizer's chat template, and the characters between that
prefix and the rendering that includes the turn (the assistant text and its end-of-turn token)
are the trained span. Templates whose renderings are not prefixes of each other are refused.

The data order is a function of (seed, step), so a checkpoint needs only its step to resume at
the same data position; with the optimizer, scheduler and RNG states restored, a resumed run
follows the same schedule as an uninterrupted one.

DPO (``config.dpo``) is implemented here rather than with trl's ``DPOTrainer``: that trainer
rests on the same ``Trainer`` machinery measured twice as slow for SFT, and it needs its own
dataset processing; the loss itself is a few lines. The reference model is the SFT adapter's
base with the adapter disabled (``model.disable_adapter()``), so no second copy is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import random
import resource
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError, ModelError, missing_dependency
from finetune.audience import dataset_audience
from finetune.base_model import is_hf_folder
from finetune.config import RunConfig
from finetune.curves import plot_loss
from finetune.precision import (
    LORA_FP32,
    Decision,
    Precision,
    by_name,
    decide,
    free_memory,
    model_shape,
    plan,
    summary,
)
from finetune.precision import candidates as precision_candidates
from finetune.precision import explicit as explicit_precision

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (torch's cross-entropy default ``ignore_index``)."""

TRAIN_FILE = "train.jsonl"
PREFERENCES_FILE = "preferences.jsonl"
MANIFEST_FILE = "manifest.json"


# --- results ----------------------------------------------------------------------------------


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


# --- data -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One tokenized sequence; ``labels`` is ``IGNORE_INDEX`` where no loss is taken."""

    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _render(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, open_turn: bool) -> str:
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=open_turn
    )
    if not isinstance(text, str):
        raise ModelError("the tokenizer's chat template did not render to text")
    return text


def assistant_spans(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], *, only_last: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering of ``messages`` and the character spans the loss is taken on.

    A span runs from the end of the rendering of the turns before an assistant turn (with the
    generation prompt, i.e. the assistant header) to the end of the rendering that includes the
    turn: the assistant's text and the template's end-of-turn token (and whatever the template
    puts right after it, such as a newline).
    """
    full = _render(tokenizer, messages, open_turn=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if only_last and i != len(messages) - 1:
            continue
        prefix = _render(tokenizer, messages[:i], open_turn=True)
        through = _render(tokenizer, messages[: i + 1], open_turn=False)
        if not (through.startswith(prefix) and full.startswith(through)):
            raise ModelError(
                "the tokenizer's chat template does not render conversations as prefixes of "
                "each other (the rendering up to an assistant turn is not the start of the "
                "rendering that includes it), so assistant-only loss cannot be located; use a "
                "base model whose template is prefix-preserving (ChatML templates are)"
            )
        if len(through) > len(prefix):
            spans.append((len(prefix), len(through)))
    return full, spans


def tokenize_conversation(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    max_seq_len: int,
    *,
    only_last: bool = False,
) -> Example | None:
    """Token ids and labels of one conversation, or None when no assistant token fits.

    Too long a conversation is cut at the front: the tail of the prompt (what the answer
    responds to) and the last answer are kept. When the last answer cannot be kept whole with
    at least one token of prompt before it, the example is skipped rather than trained on an
    answer without its question.
    """
    full, spans = assistant_spans(tokenizer, messages, only_last=only_last)
    if not spans:
        return None
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoded["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in encoded["offset_mapping"]]
    labels = [IGNORE_INDEX] * len(ids)
    for index, (start, end) in enumerate(offsets):
        # A token belongs to a span when its characters start inside it (a token that straddles
        # the span start, e.g. a merged newline, stays unlabelled: it is the prompt's).
        if end > start and any(lo <= start < hi for lo, hi in spans):
            labels[index] = ids[index]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    if len(ids) > max_seq_len:
        cut = len(ids) - max_seq_len
        last_start = min(i for i, (s, _) in enumerate(offsets) if s >= spans[-1][0])
        if cut >= last_start:
            return None
        ids, labels = ids[cut:], labels[cut:]
    return Example(ids, labels)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{number} is not valid JSON: {exc.msg}") from exc
            if not isinstance(record, dict):
                raise ConfigError(f"{path}:{number} is not a JSON object")
            records.append(record)
    return records


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list")
    for message in messages:
        if (
            not isinstance(message, dict)
            or message.get("role") not in ("system", "user", "assistant")
            or not isinstance(message.get("content"), str)
        ):
            raise ConfigError(
                f"{where}: each message needs a role (system, user or assistant) and a text "
                f"content, not {message!r:.120}"
            )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def load_sft_examples(
    tokenizer: Any, dataset_dir: Path, max_seq_len: int
) -> tuple[list[Example], int]:
    """The tokenized ``train.jsonl`` of a dataset folder and how many records were skipped."""
    path = dataset_dir / TRAIN_FILE
    if not path.is_file():
        raise ConfigError(f"dataset folder {dataset_dir} has no {TRAIN_FILE}")
    examples: list[Example] = []
    skipped = 0
    for number, record in enumerate(_read_jsonl(path), 1):
        messages = _check_messages(record.get("messages"), f"{path}:{number}")
        example = tokenize_conversation(tokenizer, messages, max_seq_len)
        if example is None:
            skipped += 1
        else:
            examples.append(example)
    if not examples:
        raise ConfigError(
            f"no record of {path} fits max_seq_len={max_seq_len} with an assistant answer "
            f"({skipped} skipped); raise max_seq_len or shorten the records"
        )
    if skipped:
        log.warning(
            "%d of %d training records skipped: too long for max_seq_len=%d",
            skipped,
            skipped + len(examples),
            max_seq_len,
        )
    return examples, skipped


def load_preference_pairs(
    tokenizer: Any, dataset_dir: Path, max_seq_len: int
) -> list[tuple[Example, Example]]:
    """(chosen, rejected) examples of ``preferences.jsonl``; pairs that cannot fit are dropped."""
    path = dataset_dir / PREFERENCES_FILE
    if not path.is_file():
        return []
    pairs: list[tuple[Example, Example]] = []
    for number, record in enumerate(_read_jsonl(path), 1):
        where = f"{path}:{number}"
        prompt = _check_messages(record.get("prompt"), where)
        chosen, rejected = record.get("chosen"), record.get("rejected")
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise ConfigError(f"{where}: 'chosen' and 'rejected' must be texts")
        both = [
            tokenize_conversation(
                tokenizer,
                [*prompt, {"role": "assistant", "content": answer}],
                max_seq_len,
                only_last=True,
            )
            for answer in (chosen, rejected)
        ]
        if both[0] is not None and both[1] is not None:
            pairs.append((both[0], both[1]))
    return pairs


def collate(examples: Sequence[Example], pad_id: int, device: Any = "cpu") -> dict[str, Any]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
    }


def batch_indices(
    n_examples: int, seed: int, step: int, micro: int, micro_batches: int, batch_size: int
) -> list[int]:
    """Example indices of micro-batch ``micro`` of optimizer step ``step`` (1-based).

    The examples are consumed epoch after epoch, each in an order drawn from ``seed + epoch``:
    a pure function of the step, so a resumed run reads exactly what the interrupted one would.
    """
    import torch

    first = ((step - 1) * micro_batches + micro) * batch_size
    out: list[int] = []
    orders: dict[int, list[int]] = {}
    for position in range(first, first + batch_size):
        epoch, index = divmod(position, n_examples)
        if epoch not in orders:
            generator = torch.Generator().manual_seed(seed + epoch)
            orders[epoch] = torch.randperm(n_examples, generator=generator).tolist()
        out.append(orders[epoch][index])
    return out


# --- model ------------------------------------------------------------------------------------


def _import_training_stack() -> None:
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise missing_dependency(exc.name or "peft", package="torch transformers peft") from exc


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def bnb_unavailable_reason(device: str) -> str | None:
    """Why bitsandbytes cannot quantize to NF4 on ``device`` (None: it can).

    Probed by a real round trip on a small tensor: an importable bitsandbytes without a backend
    for the device fails only there, not at import.
    """
    import torch

    try:
        import bitsandbytes.functional as bnb_functional
    except Exception as exc:  # an ImportError, or a broken native library
        return f"bitsandbytes is not usable ({type(exc).__name__}: {exc})"
    try:
        weight = torch.randn(64, 64, dtype=torch.bfloat16, device=device)
        packed, state = bnb_functional.quantize_4bit(
            weight, quant_type="nf4", compress_statistics=True
        )
        back = bnb_functional.dequantize_4bit(packed, state).float()
    except Exception as exc:
        return f"bitsandbytes cannot quantize to NF4 on {device} ({type(exc).__name__}: {exc})"
    error = (back - weight.float()).abs().mean().item()
    if not math.isfinite(error) or error > 0.25:
        return f"bitsandbytes' NF4 round trip on {device} is wrong (mean error {error:.3f})"
    return None


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    mode: str
    device: str
    fallback_reason: str | None
    precision: Precision = LORA_FP32


def load_tokenizer(base: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(
            f"the tokenizer of {base} is not a fast tokenizer; assistant-only loss needs its "
            "character offsets"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"the tokenizer of {base} has no chat template")
    return tokenizer


def load_model(
    base: Path,
    config: RunConfig,
    device: str,
    precision: Precision | None = None,
    *,
    tokenizer: Any = None,
) -> LoadedModel:
    """The base in ``precision`` (default: what an explicit ``config.quantization`` names)
    with fresh LoRA adapters on ``target_modules``.

    On CUDA the whole model goes to the current GPU (``device_map={"": index}``: bitsandbytes
    quantizes while loading, so it must land there at once); on the CPU NF4 is also loaded with
    ``device_map="cpu"``. NF4 falls back to plain LoRA (and says why) where bitsandbytes cannot
    quantize on the device.
    """
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if tokenizer is None:
        tokenizer = load_tokenizer(base)
    cuda = device == "cuda"
    if precision is None:
        precision = explicit_precision(config.quantization, device)
    fallback: str | None = None
    if precision.quantize:
        fallback = bnb_unavailable_reason(device)
        if fallback is not None:
            log.warning("QLoRA is not possible here, training plain LoRA instead: %s", fallback)
            precision = explicit_precision("none", device)
    compute = torch.bfloat16 if precision.compute_dtype == "bfloat16" else torch.float32
    common: dict[str, Any] = {"local_files_only": True}
    model: Any
    if precision.quantize:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(base),
            quantization_config=bnb,
            device_map={"": torch.cuda.current_device()} if cuda else "cpu",
            # The weights that stay unquantized; k-bit preparation casts them to fp32 anyway.
            dtype=compute if cuda else torch.float32,
            **common,
        )
        # Casts the remaining (norm, embedding) weights to fp32 and freezes the base.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=compute, **common)
        model.to(device)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            # Frozen embeddings give inputs without grad; checkpointed blocks then need this.
            model.enable_input_require_grads()
    model.config.use_cache = False  # the KV cache is useless in training and clashes with GC
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise ConfigError(
            f"target_modules {config.target_modules} do not fit {base}: {exc}"
        ) from exc
    return LoadedModel(model, tokenizer, precision.mode(device), device, fallback, precision)


def _timed_step(model: Any, batch: Mapping[str, Any], device: str) -> float:
    """Seconds of one forward and backward pass (gradients dropped afterwards)."""
    import torch

    t0 = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def _release(device: str) -> None:
    """Return a dropped model's memory before the next one loads."""
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def measure_precision(
    base: Path,
    config: RunConfig,
    device: str,
    batch_examples: Sequence[Example],
    pad_id: int,
    *,
    tokenizer: Any = None,
    say: Callable[[str], None] | None = None,
) -> Decision:
    """``run.quantization: auto``: time a step of every candidate that fits and pick the fastest.

    Each candidate is loaded from the same Hugging Face folder (the GGUF was dequantized once,
    before), takes one warm-up and one timed forward and backward pass on ``batch_examples``
    (the run's own first batch), and is freed before the next one loads.
    """
    shape = model_shape(base)
    free = free_memory(device)
    nf4_problem = bnb_unavailable_reason(device)
    options = precision_candidates(device)
    unavailable = {p.name: nf4_problem for p in options if p.quantize and nf4_problem}
    trials = plan(options, shape, free, config.batch_size, config.max_seq_len, unavailable)
    if tokenizer is None:
        tokenizer = load_tokenizer(base)

    def measure(precision: Precision) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        loaded: LoadedModel | None = load_model(
            base, config, device, precision, tokenizer=tokenizer
        )
        assert loaded is not None
        load_s = time.perf_counter() - t0
        try:
            loaded.model.train()
            batch = collate(batch_examples, pad_id, device)
            warm = _timed_step(loaded.model, batch, device)
            step = _timed_step(loaded.model, batch, device)
        finally:
            loaded = None
            _release(device)
        return load_s, warm, step

    tokens = sum(len(e.input_ids) for e in batch_examples)
    return decide(trials, measure, device=device, free_bytes=free, batch_tokens=tokens, say=say)


def _trainable(model: Any) -> list[Any]:
    return [p for p in model.parameters() if p.requires_grad]


def load_adapter_weights(model: Any, folder: Path) -> None:
    """Put the adapter weights saved in ``folder`` into ``model`` (safetensors only)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
        raise ModelError(
            f"{folder} holds no adapter_model.safetensors"
            + (f" (refusing pickled weights {pickled})" if pickled else "")
        )
    result = set_peft_model_state_dict(model, load_file(str(weights)))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ModelError(f"adapter weights in {folder} do not fit the model: {unexpected[:5]}")


# --- files of a run ---------------------------------------------------------------------------


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def dataset_sha256(dataset_dir: Path) -> str:
    """The manifest's digest, or (no manifest) a digest of the training files themselves."""
    manifest = dataset_dir / MANIFEST_FILE
    if manifest.is_file():
        try:
            sha = json.loads(manifest.read_text(encoding="utf-8")).get("sha256")
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{manifest} is not valid JSON: {exc.msg}") from exc
        if isinstance(sha, str) and sha:
            return sha
    digest = hashlib.sha256()
    for name in (TRAIN_FILE, PREFERENCES_FILE):
        path = dataset_dir / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _base_digest(base: Path) -> str:
    digest = hashlib.sha256()
    for path in [*sorted(base.glob("*.safetensors")), base / "config.json"]:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _versions(device: str) -> dict[str, Any]:
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


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in (run_dir / "checkpoints").glob("step-*"):
        suffix = path.name.removeprefix("step-")
        if suffix.isdigit() and (path / "state.json").is_file():
            found.append((int(suffix), path))
    return sorted(found)


# --- the loop ---------------------------------------------------------------------------------


@dataclass
class _State:
    step: int = 0
    train_tokens: int = 0
    elapsed: float = 0.0
    last_loss: float | None = None


class _Run:
    """One training session of a run folder (a fresh start or a resume)."""

    def __init__(
        self,
        run_dir: Path,
        meta: dict[str, Any],
        config: RunConfig,
        progress: bool,
        stop: threading.Event | None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.meta = meta
        self.config = config
        self.base = Path(meta["base"])
        self.dataset_dir = Path(meta["dataset_dir"])
        self.show_progress = progress
        self.stop = stop or threading.Event()
        self.state = _State()
        self.skipped = 0
        self.say = say
        self.precision_record: dict[str, Any] | None = None

    # -- setup --

    def setup(self, checkpoint: Path | None) -> None:
        import torch

        _import_training_stack()
        self.device = pick_device()
        if self.device == "cpu":
            torch.set_num_threads(self.config.threads or os.cpu_count() or 1)
        tokenizer = load_tokenizer(self.base)
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self.examples, self.skipped = load_sft_examples(
            tokenizer, self.dataset_dir, self.config.max_seq_len
        )
        precision = self._precision(tokenizer)
        # Seeded before the adapters are created: the LoRA init and dropout follow the seed.
        torch.manual_seed(self.config.seed)
        random.seed(self.config.seed)
        self.loaded = load_model(
            self.base, self.config, self.device, precision, tokenizer=tokenizer
        )
        self.model = self.loaded.model
        if self.loaded.precision != precision and self.precision_record is not None:
            # NF4 was named but bitsandbytes cannot quantize here: record what really trains.
            self.precision_record.update(
                chosen=self.loaded.precision.name,
                mode=self.loaded.mode,
                reason=f"{self.precision_record['reason']}; fell back: "
                f"{self.loaded.fallback_reason}",
            )
            _write_json_atomic(self.run_dir / "config.json", self.meta)
        self.optimizer = torch.optim.AdamW(
            _trainable(self.model),
            lr=self.config.learning_rate,
            weight_decay=self.config.weight_decay,
        )
        from transformers import get_cosine_schedule_with_warmup

        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, self.config.resolved_warmup, self.config.max_steps
        )
        if checkpoint is not None:
            self._restore(checkpoint)

    def _precision(self, tokenizer: Any) -> Precision:
        """The run's precision: recorded in config.json by an earlier session of this run (a
        resume keeps what the run started with), named by the config, or measured now."""
        recorded = self.meta.get("precision")
        if isinstance(recorded, dict) and recorded.get("device") == self.device:
            self.precision_record = recorded
            return by_name(str(recorded["chosen"]))
        if self.config.quantization != "auto":
            chosen = explicit_precision(self.config.quantization, self.device)
            decision = Decision(
                self.config.quantization,
                chosen,
                self.device,
                f"run.quantization: {self.config.quantization}",
            )
        else:
            first = batch_indices(
                len(self.examples),
                self.config.seed,
                1,
                0,
                self.config.grad_accum,
                self.config.batch_size,
            )
            decision = measure_precision(
                self.base,
                self.config,
                self.device,
                [self.examples[i] for i in first],
                self.pad_id,
                tokenizer=tokenizer,
                say=self.say,
            )
        self.precision_record = decision.to_json()
        self.meta["precision"] = self.precision_record
        _write_json_atomic(self.run_dir / "config.json", self.meta)
        if self.say is not None:
            self.say(summary(self.precision_record))
        return decision.chosen

    def _restore(self, checkpoint: Path) -> None:
        import torch

        load_adapter_weights(self.model, checkpoint)
        # weights_only: these files hold tensors and plain containers; nothing is unpickled
        # that could run code.
        self.optimizer.load_state_dict(
            torch.load(checkpoint / "optimizer.pt", weights_only=True, map_location=self.device)
        )
        self.scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
        rng = torch.load(checkpoint / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(_as_random_state(rng["python"]))
        state = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
        self.state = _State(
            step=state["step"],
            train_tokens=state["train_tokens"],
            elapsed=state["elapsed"],
            last_loss=state["last_loss"],
        )
        self._truncate_loss_log(self.state.step)

    def _truncate_loss_log(self, step: int) -> None:
        """Steps logged after the checkpoint (a crash) are redone: drop their records."""
        path = self.run_dir / "loss.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("phase", "sft") == "sft" and record["step"] <= step:
                kept.append(line)
        tmp = path.with_name(".loss.jsonl.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)

    # -- bookkeeping --

    def _progress(self, status: str, phase: str = "sft", **extra: Any) -> None:
        elapsed = self.state.elapsed
        session_steps = self.state.step - self.session_start_step
        session_s = max(time.perf_counter() - self.session_t0, 1e-9)
        _write_json_atomic(
            self.run_dir / "progress.json",
            {
                "status": status,
                "phase": phase,
                "step": self.state.step,
                "max_steps": self.config.max_steps,
                "loss": self.state.last_loss,
                "steps_per_s": round(session_steps / session_s, 4) if session_steps else None,
                "tokens_per_s": round(self.state.train_tokens / elapsed, 2) if elapsed else None,
                "elapsed_s": round(elapsed, 2),
                "updated": time.time(),
                **extra,
            },
        )

    def _log(self, record: dict[str, Any]) -> None:
        with (self.run_dir / "loss.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _checkpoint(self) -> None:
        import torch

        folder = self.run_dir / "checkpoints"
        folder.mkdir(exist_ok=True)
        final = folder / f"step-{self.state.step}"
        tmp = folder / f".tmp-step-{self.state.step}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(str(tmp), safe_serialization=True)
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        _write_json_atomic(tmp / "state.json", asdict(self.state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in _checkpoints(self.run_dir)[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def _result(self, status: str, adapter: Path | None, **extra: Any) -> RunResult:
        elapsed = self.state.elapsed
        return RunResult(
            run_dir=self.run_dir,
            adapter_dir=adapter,
            base_dir=self.base,
            steps=self.state.step,
            final_loss=self.state.last_loss,
            train_tokens=self.state.train_tokens,
            tokens_per_s=round(self.state.train_tokens / elapsed, 2) if elapsed else 0.0,
            peak_rss_mb=_peak_rss_mb(),
            mode=self.loaded.mode,
            device=self.device,
            fallback_reason=self.loaded.fallback_reason,
            status=status,
            max_steps=self.config.max_steps,
            skipped_examples=self.skipped,
            precision=self.precision_record,
            **extra,
        )

    # -- training --

    def sft_step(self, step: int) -> tuple[float, int]:
        """One optimizer step; returns the mean loss of its micro-batches and its tokens."""
        import torch

        config = self.config
        self.model.train()
        total_loss, tokens = 0.0, 0
        for micro in range(config.grad_accum):
            indices = batch_indices(
                len(self.examples), config.seed, step, micro, config.grad_accum, config.batch_size
            )
            batch = collate([self.examples[i] for i in indices], self.pad_id, self.device)
            loss = self.model(**batch).loss / config.grad_accum
            loss.backward()
            total_loss += loss.item()
            tokens += int(batch["attention_mask"].sum().item())
        torch.nn.utils.clip_grad_norm_(_trainable(self.model), config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total_loss, tokens

    def run(self) -> RunResult:
        from tqdm.auto import tqdm

        config = self.config
        self.session_start_step = self.state.step
        self.session_t0 = time.perf_counter()
        self._progress("running")
        bar = tqdm(
            total=config.max_steps,
            initial=self.state.step,
            unit="step",
            disable=not self.show_progress,
            desc="fine-tuning",
        )
        try:
            while self.state.step < config.max_steps:
                step = self.state.step + 1
                lr = self.scheduler.get_last_lr()[0]
                t0 = time.perf_counter()
                loss, tokens = self.sft_step(step)
                seconds = time.perf_counter() - t0
                self.state = _State(
                    step, self.state.train_tokens + tokens, self.state.elapsed + seconds, loss
                )
                self._log(
                    {
                        "step": step,
                        "loss": round(loss, 6),
                        "lr": lr,
                        "tokens": tokens,
                        "elapsed": round(self.state.elapsed, 3),
                    }
                )
                self._progress("running")
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", steps_s=f"{1 / seconds:.3f}")
                stopping = self.stop.is_set() and step < config.max_steps
                if stopping or step % config.save_every == 0 or step == config.max_steps:
                    self._checkpoint()
                if stopping:
                    return self._finish_stopped()
        finally:
            bar.close()
        return self._finish()

    def _finish_stopped(self) -> RunResult:
        log.info("run %s stopped at step %d; resume continues it", self.run_dir, self.state.step)
        self._progress("stopped")
        self._plot()
        result = self._result("stopped", None)
        _write_json_atomic(self.run_dir / "result.json", result.to_json())
        return result

    def _finish(self) -> RunResult:
        extra: dict[str, Any] = {}
        if self.config.dpo:
            pairs = load_preference_pairs(
                self.loaded.tokenizer, self.dataset_dir, self.config.max_seq_len
            )
            if pairs:
                dpo_result = self._dpo(pairs)
                if dpo_result is None:
                    return self._finish_stopped()
                extra.update(dpo_steps=dpo_result[0], dpo_final_loss=dpo_result[1])
            else:
                log.warning(
                    "dpo is on but %s has no usable preference pairs; SFT only", self.dataset_dir
                )
        adapter = self.run_dir / "adapter"
        tmp = self.run_dir / ".tmp-adapter"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(str(tmp), safe_serialization=True)
        shutil.rmtree(adapter, ignore_errors=True)
        os.replace(tmp, adapter)
        self._plot()
        result = self._result("done", adapter, **extra)
        _write_json_atomic(self.run_dir / "result.json", result.to_json())
        self._progress("done")
        return result

    def _plot(self) -> None:
        try:
            plot_loss(
                self.run_dir / "loss.jsonl",
                self.run_dir / "loss.png",
                title=f"{self.run_dir.name}: {self.loaded.mode}",
            )
        except Exception as exc:  # a missing curve must not lose a finished run
            log.warning("could not draw the loss curve of %s: %s", self.run_dir, exc)

    # -- DPO --

    def _sequence_logps(self, pairs: Sequence[tuple[Example, Example]]) -> Any:
        """Summed log-probabilities of the answer tokens: chosen rows first, then rejected."""
        import torch

        examples = [p[0] for p in pairs] + [p[1] for p in pairs]
        batch = collate(examples, self.pad_id, self.device)
        logits = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits.float()
        labels = batch["labels"][:, 1:]
        logps = torch.log_softmax(logits[:, :-1], dim=-1)
        mask = labels != IGNORE_INDEX
        picked = torch.gather(logps, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * mask).sum(-1)

    def _dpo(self, pairs: list[tuple[Example, Example]]) -> tuple[int, float] | None:
        """DPO steps on the SFT adapter; (steps, last loss), or None when stopped."""
        import torch
        import torch.nn.functional as functional

        config = self.config
        optimizer = torch.optim.AdamW(_trainable(self.model), lr=config.dpo_learning_rate)
        generator = torch.Generator().manual_seed(config.seed)
        size = min(config.batch_size, len(pairs))
        last = math.nan
        for step in range(1, config.dpo_steps + 1):
            chosen = torch.randperm(len(pairs), generator=generator)[:size].tolist()
            batch = [pairs[i] for i in chosen]
            t0 = time.perf_counter()
            self.model.eval()  # the reference pass sees no dropout
            with torch.no_grad(), self.model.disable_adapter():
                reference = self._sequence_logps(batch)
            self.model.train()
            policy = self._sequence_logps(batch)
            n = len(batch)
            margin = (policy[:n] - reference[:n]) - (policy[n:] - reference[n:])
            loss = -functional.logsigmoid(config.dpo_beta * margin).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(_trainable(self.model), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            last = loss.item()
            self._log(
                {
                    "step": config.max_steps + step,
                    "loss": round(last, 6),
                    "lr": config.dpo_learning_rate,
                    "phase": "dpo",
                    "reward_margin": round(config.dpo_beta * margin.mean().item(), 6),
                    "elapsed": round(time.perf_counter() - t0, 3),
                }
            )
            self._progress(
                "running", phase="dpo", dpo_step=step, dpo_steps=config.dpo_steps, dpo_loss=last
            )
            if self.stop.is_set() and step < config.dpo_steps:
                return None
        return config.dpo_steps, last


def _as_random_state(value: Any) -> tuple[Any, ...]:
    # torch.save keeps tuples, but be lenient with lists from other writers.
    version, internal, gauss = value
    return (version, tuple(internal), gauss)


# --- public API -------------------------------------------------------------------------------


_RUN_BOOKKEEPING = frozenset({"request.json", "state.json", "state.json.tmp", "run.log", "stop"})


def train(
    run_dir: Path,
    dataset_dir: Path,
    config: RunConfig,
    *,
    base: Path,
    progress: bool = True,
    stop: threading.Event | None = None,
    say: Callable[[str], None] | None = None,
) -> RunResult:
    """Fine-tune ``base`` (a Hugging Face folder, see ``ensure_hf_base``) on ``dataset_dir``.

    ``run_dir`` must be new or empty. Setting ``stop`` ends the run after the current step with
    a checkpoint (status "stopped"); ``resume(run_dir)`` continues it. ``say`` hears what people
    should know before the steps start (the precision chosen and its timings).
    """
    run_dir, dataset_dir, base = Path(run_dir), Path(dataset_dir), Path(base)
    if not is_hf_folder(base):
        raise ConfigError(
            f"base {base} is not a Hugging Face model folder; turn a GGUF into one with "
            "finetune.base_model.ensure_hf_base"
        )
    if not (dataset_dir / TRAIN_FILE).is_file():
        raise ConfigError(f"dataset folder {dataset_dir} has no {TRAIN_FILE}")
    # The run's own bookkeeping (finetune.runs: request, state, log, stop) may be there already.
    if run_dir.exists() and any(p.name not in _RUN_BOOKKEEPING for p in run_dir.iterdir()):
        raise ConfigError(f"run folder {run_dir} is not empty; resume it or choose a new one")
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "run": config.model_dump(mode="json"),
        "base": str(base.resolve()),
        "base_sha256": _base_digest(base),
        "dataset_dir": str(dataset_dir.resolve()),
        "dataset_sha256": dataset_sha256(dataset_dir),
        "audience": dataset_audience(dataset_dir),  # the collections it learns from
        "created": time.time(),
    }
    _write_json_atomic(run_dir / "config.json", meta)
    return _execute(run_dir, meta, config, progress, stop, checkpoint=None, say=say)


def resume(
    run_dir: Path,
    *,
    progress: bool = True,
    stop: threading.Event | None = None,
    say: Callable[[str], None] | None = None,
) -> RunResult:
    """Continue a stopped or interrupted run from its newest checkpoint (a finished run returns
    its result)."""
    run_dir = Path(run_dir)
    result_path = run_dir / "result.json"
    if result_path.is_file():
        previous = RunResult.from_json(json.loads(result_path.read_text(encoding="utf-8")))
        if previous.status == "done":
            return previous
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} holds no fine-tuning run (no config.json)")
    meta = json.loads(config_path.read_text(encoding="utf-8"))
    config = RunConfig.model_validate(meta["run"])
    dataset_dir = Path(meta["dataset_dir"])
    if dataset_sha256(dataset_dir) != meta["dataset_sha256"]:
        raise ConfigError(
            f"the dataset {dataset_dir} changed since run {run_dir} started; start a new run"
        )
    found = _checkpoints(run_dir)
    checkpoint = found[-1][1] if found else None
    return _execute(run_dir, meta, config, progress, stop, checkpoint=checkpoint, say=say)


def _execute(
    run_dir: Path,
    meta: dict[str, Any],
    config: RunConfig,
    progress: bool,
    stop: threading.Event | None,
    checkpoint: Path | None,
    say: Callable[[str], None] | None = None,
) -> RunResult:
    session = _Run(run_dir, meta, config, progress, stop, say)
    session.session_start_step = 0
    session.session_t0 = time.perf_counter()
    try:
        session.setup(checkpoint)
        _write_json_atomic(run_dir / "versions.json", _versions(session.device))
        return session.run()
    except BaseException as exc:
        # KeyboardInterrupt too: a UI polling progress.json must not show "running" forever.
        _write_json_atomic(
            run_dir / "progress.json",
            {
                "status": "failed",
                "step": session.state.step,
                "max_steps": config.max_steps,
                "error": f"{type(exc).__name__}: {exc}",
                "updated": time.time(),
            },
        )
        raise


def iter_loss_records(run_dir: Path) -> Iterator[dict[str, Any]]:
    """The records of a run's ``loss.jsonl`` (for UIs and reports)."""
    from finetune.curves import read_loss_log

    yield from read_loss_log(Path(run_dir) / "loss.jsonl")


__all__ = [
    "IGNORE_INDEX",
    "Example",
    "RunResult",
    "bnb_unavailable_reason",
    "collate",
    "load_sft_examples",
    "resume",
    "tokenize_conversation",
    "train",
]
