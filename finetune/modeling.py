"""Loading the model to fine-tune: the base from a Hugging Face folder in the chosen precision
(NF4 through bitsandbytes, or plain), with fresh LoRA adapters; the device; and, for
``run.quantization: auto``, one timed step per candidate precision to pick the fastest.
torch, transformers, peft and bitsandbytes are imported when a model is loaded.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.core.errors import ConfigError, ModelError, missing_dependency
from finetune.batches import Example, collate
from finetune.config import RunConfig
from finetune.precision import (
    LORA_FP32,
    Decision,
    Precision,
    decide,
    free_memory,
    model_shape,
    plan,
)
from finetune.precision import candidates as precision_candidates
from finetune.precision import explicit as explicit_precision

log = logging.getLogger(__name__)


def import_training_stack() -> None:
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


def timed_step(model: Any, batch: Mapping[str, Any], device: str) -> float:
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


def release_memory(device: str) -> None:
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
            warm = timed_step(loaded.model, batch, device)
            step = timed_step(loaded.model, batch, device)
        finally:
            loaded = None
            release_memory(device)
        return load_s, warm, step

    tokens = sum(len(e.input_ids) for e in batch_examples)
    return decide(trials, measure, device=device, free_bytes=free, batch_tokens=tokens, say=say)


def trainable(model: Any) -> list[Any]:
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
