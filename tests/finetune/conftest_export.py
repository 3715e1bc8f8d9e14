"""Real tiny artifacts for the export tests: the dequantized default model and LoRA adapters.

Imported by ``test_export.py`` (``tests/finetune/conftest.py`` belongs to the training tests).
The dequantized base (538 MB, about 30 s to build) lives in pytest's cache folder, keyed by the
GGUF's sha256 (``finetune.base_model.ensure_hf_base``), so a second session reuses it; the
adapters and exports are per session.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir: Path, out_dir: Path, *, scale: float, seed: int = 0) -> Path:
    """A peft LoRA adapter (r=4 on all seven projections) for ``base_dir``; ``lora_B`` is
    random with standard deviation ``scale`` (0: peft's zero init, an identity adapter)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                # peft starts lora_B at zero, so an untrained adapter merges to the base itself.
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


@pytest.fixture(scope="session")
def hf_base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from appliance.core.chat_settings import default_chat_model_path
    from finetune.base_model import ensure_hf_base

    cache = request.config.cache
    folder = (
        cache.mkdir("finetune-hf-base") if cache is not None else tmp_path_factory.mktemp("base")
    )
    return ensure_hf_base(default_chat_model_path(), folder)


@pytest.fixture(scope="session")
def lora_adapter(hf_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(hf_base, tmp_path_factory.mktemp("lora") / "adapter", scale=0.05)


@pytest.fixture(scope="session")
def zero_adapter(hf_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(hf_base, tmp_path_factory.mktemp("lora0") / "adapter", scale=0.0)


@pytest.fixture(scope="session")
def exported(hf_base: Path, lora_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``export_run`` of the perturbed adapter, once per session (about a minute)."""
    from appliance.chat.factory import smoke_chat_model
    from finetune.export import export_run

    return export_run(
        hf_base,
        lora_adapter,
        tmp_path_factory.mktemp("export") / "v1",
        "Q4_K_M",
        load=lambda path: smoke_chat_model(path, 2),
        n_threads=2,
    )


@pytest.fixture(scope="session")
def base_f16_gguf(hf_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dequantized default model converted back to an f16 GGUF."""
    from finetune.export import convert_to_gguf

    return convert_to_gguf(hf_base, tmp_path_factory.mktemp("basegguf") / "base-f16.gguf")
