"""The configuration of one fine-tuning run, saved beside its outputs (``config.json``).

``load_run_config(path, **overrides)`` reads a YAML file (or nothing: the defaults) and applies
keyword overrides on top; unknown keys are refused so a typo never silently trains with a
default. The defaults are the QLoRA recipe of the issue: LoRA r=16, alpha=32 on every attention
and MLP projection, lr 2e-4 with a cosine schedule and warmup; the precision (4-bit NF4 with
double quantization and bf16 or fp32 compute, or plain LoRA) is measured on the machine at the
start of the run (``finetune.precision``) unless the config names one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from appliance.core.errors import ConfigError

ALL_PROJECTIONS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


class RunConfig(BaseModel):
    """Everything that decides what a run trains; ``config.json`` of a run holds it resolved."""

    model_config = ConfigDict(extra="forbid")

    lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(ALL_PROJECTIONS),
        min_length=1,
        description="Linear layers that get adapters: all attention and MLP projections.",
    )
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(
        -1,
        ge=-1,
        description="Linear warmup steps before the cosine decay; -1: 5% of max_steps (at "
        "least 1).",
    )
    max_steps: int = Field(60, ge=1, description="Optimizer steps of supervised fine-tuning.")
    batch_size: int = Field(4, ge=1, description="Sequences per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Forward passes per optimizer step.")
    max_seq_len: int = Field(512, ge=16, le=32768, description="Longest training sequence.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(0, description="Seeds LoRA init, dropout and the data order.")
    quantization: Literal["auto", "nf4", "none"] = Field(
        "auto",
        description="auto: time one training step of each candidate that fits in memory (NF4 "
        "with bf16 compute, NF4 with fp32 compute, plain LoRA in fp32 on a CPU or bf16 on CUDA) "
        "and train in the fastest; nf4: QLoRA (4-bit NF4, double quantization, bf16 compute) "
        "where bitsandbytes can quantize on this device; none: LoRA on the fp32 (or bf16 on "
        "CUDA) base.",
    )
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in the backward pass to save memory."
    )
    save_every: int = Field(
        20, ge=1, description="Write a resumable checkpoint every this many steps."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept (the newest).")
    dpo: bool = Field(False, description="Run DPO on the SFT adapter when preferences exist.")
    dpo_beta: float = Field(0.1, gt=0, description="DPO temperature (beta).")
    dpo_steps: int = Field(20, ge=1, description="DPO optimizer steps.")
    dpo_learning_rate: float = Field(5e-5, gt=0, le=1, description="DPO learning rate.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; empty: all cores.")

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})"
            )
        return self

    @property
    def resolved_warmup(self) -> int:
        if self.warmup_steps >= 0:
            return self.warmup_steps
        return max(1, round(0.05 * self.max_steps)) if self.max_steps > 1 else 0


def load_run_config(path: Path | None = None, **overrides: Any) -> RunConfig:
    """A run config from a YAML mapping (or the defaults), with ``overrides`` on top."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read run config {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"run config {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"run config {path} must hold a mapping at the top level")
        data = loaded
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid run config: {problems}") from exc
