"""The CUDA path, on a real GPU: device selection, NF4 with bf16 compute, ``auto``'s candidates.

Skipped with a reason where torch sees no CUDA device (tests/conftest.py); the selection logic
itself is tested on the CPU in test_precision.py. ``benchmarks/finetune_gpu.sh`` runs these after
its 100-step run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.batches import collate, load_sft_examples
from finetune.config import load_run_config
from finetune.modeling import load_model, pick_device
from finetune.precision import NF4_BF16
from finetune.train import train
from tests.finetune.conftest import write_dataset
from tests.finetune.format_data import make_format_records

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

TINY = {"batch_size": 2, "max_seq_len": 128, "save_every": 100}


def test_nf4_with_bf16_compute_lands_on_the_gpu_and_trains(tmp_path: Path, hf_base: Path) -> None:
    import torch

    assert pick_device() == "cuda"
    config = load_run_config(None, max_steps=1, quantization="nf4", **TINY)
    loaded = load_model(hf_base, config, "cuda", NF4_BF16)
    assert loaded.mode == "qlora-nf4-cuda"
    assert loaded.fallback_reason is None
    quantized = [m for m in loaded.model.modules() if type(m).__name__ == "Linear4bit"]
    assert quantized, "no layer was quantized to 4 bits"
    assert all(m.weight.device.type == "cuda" for m in quantized)
    assert {m.compute_dtype for m in quantized} == {torch.bfloat16}
    dataset = write_dataset(tmp_path / "ds", make_format_records(4, seed=1))
    examples, _ = load_sft_examples(loaded.tokenizer, dataset, config.max_seq_len)
    batch = collate(examples[:2], loaded.tokenizer.pad_token_id, "cuda")
    loss = loaded.model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    lora = [p for n, p in loaded.model.named_parameters() if "lora_" in n and p.requires_grad]
    assert all(p.grad is not None and p.grad.device.type == "cuda" for p in lora)


def test_auto_on_cuda_measures_the_gpu_candidates(tmp_path: Path, hf_base: Path) -> None:
    dataset = write_dataset(tmp_path / "ds", make_format_records(8, seed=1))
    config = load_run_config(None, max_steps=2, quantization="auto", **TINY)
    result = train(tmp_path / "run", dataset, config, base=hf_base, progress=False)
    assert result.device == "cuda"
    assert result.mode.endswith("-cuda")
    precision = json.loads((result.run_dir / "config.json").read_text())["precision"]
    assert [c["name"] for c in precision["candidates"]] == ["nf4-bf16", "nf4-fp32", "lora-bf16"]
    assert precision["device"] == "cuda"
    assert precision["free_mb"] > 0
    measured = {c["name"]: c["step_s"] for c in precision["candidates"] if c["step_s"]}
    assert precision["chosen"] == min(measured, key=lambda name: measured[name])
    versions = json.loads((result.run_dir / "versions.json").read_text())
    assert versions["gpu"]
