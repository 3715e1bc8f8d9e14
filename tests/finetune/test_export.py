"""Merge, GGUF conversion, quantization, the smoke check and the LoRA GGUF, on the real default
model (SmolLM2-135M dequantized to fp32) with tiny real LoRA adapters made by the fixtures."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from appliance.chat.factory import smoke_chat_model
from appliance.core.errors import ExportError
from finetune import export
from tests.finetune import conftest_export as _fixtures

# The session fixtures of conftest_export (tests/finetune/conftest.py is the training tests').
hf_base = _fixtures.hf_base
lora_adapter = _fixtures.lora_adapter
zero_adapter = _fixtures.zero_adapter
exported = _fixtures.exported
base_f16_gguf = _fixtures.base_f16_gguf

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def hf_logits(folder: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids
        return model(ids).logits[0, -1]


def gguf_logits(gguf: Path, lora: Path | None = None) -> Any:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import llama_cpp
    import numpy as np

    kwargs: dict[str, Any] = {"lora_path": str(lora)} if lora else {}
    llm = llama_cpp.Llama(
        model_path=str(gguf), n_ctx=256, n_threads=2, logits_all=True, verbose=False, **kwargs
    )
    try:
        tokens = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
        llm.eval(tokens)
        return np.array(llm.scores[llm.n_tokens - 1])
    finally:
        llm.close()


# --- fast refusals ---------------------------------------------------------------------------


def test_refuses_pickled_or_missing_adapter_weights(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ExportError, match="safetensors"):
        export.check_adapter_dir(adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    (adapter / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ExportError, match=r"pickled weights \(adapter_model.bin\)"):
        export.check_adapter_dir(adapter)
    with pytest.raises(ExportError, match="not a peft adapter"):
        export.check_adapter_dir(tmp_path)


def test_refuses_unknown_quantization_and_outtype(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown quantization 'Q9'"):
        export.quantize_gguf(tmp_path / "a.gguf", tmp_path / "b.gguf", "Q9")
    assert export.normalize_qtype("q4_k_m") == "Q4_K_M"
    with pytest.raises(ExportError, match="outtype"):
        export.convert_to_gguf(tmp_path, tmp_path / "x.gguf", "q4")


def test_converter_failure_is_a_clear_export_error(tmp_path: Path) -> None:
    folder = tmp_path / "bogus"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ExportError, match=r"converting .* to GGUF failed \(exit code"):
        export.convert_to_gguf(folder, tmp_path / "out.gguf")
    assert not list(tmp_path.glob("*.gguf*")), "no half-written output is left behind"


def test_smoke_check_refuses_a_file_that_is_not_a_model(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ExportError, match="failed its smoke check"):
        export.smoke_check(fake, load=lambda path: smoke_chat_model(path, 2))


# --- the real model --------------------------------------------------------------------------


@pytest.mark.slow
def test_zero_adapter_merges_to_the_base(hf_base: Path, zero_adapter: Path, tmp_path: Path) -> None:
    merged = export.merge_adapter(hf_base, zero_adapter, tmp_path / "merged")
    assert (merged / "model.safetensors").is_file()
    assert (
        "chat_template" in (merged / "tokenizer_config.json").read_text()
        or (merged / "chat_template.jinja").is_file()
    )
    assert json.loads((merged / "MERGED.json").read_text())["adapter_dir"] == str(zero_adapter)
    assert float((hf_logits(merged) - hf_logits(hf_base)).abs().max()) < 1e-4
    with pytest.raises(ExportError, match="already exists"):
        export.merge_adapter(hf_base, zero_adapter, merged)


@pytest.mark.slow
def test_export_run_merges_converts_quantizes_and_answers(hf_base: Path, exported: Any) -> None:
    result = exported
    # The adapter is not trivial, so the merged weights answer differently from the base.
    assert float((hf_logits(result.merged_dir) - hf_logits(hf_base)).abs().max()) > 0.1
    assert result.quantization == "Q4_K_M"
    assert result.gguf.name == "model-Q4_K_M.gguf"
    assert result.gguf.is_file()
    f16, q = result.files["f16_gguf"], result.files["gguf"]
    assert q["size"] < 0.5 * f16["size"], (q["size"], f16["size"])
    assert q["sha256"] == export.file_sha256(result.gguf)
    assert f16["sha256"] == export.file_sha256(result.f16_gguf)
    assert set(result.timings_s) >= {"merge", "convert_f16", "quantize", "smoke_check"}
    assert result.smoke_answer.strip()
    assert result.warnings == []
    saved = json.loads((result.out_dir / "export.json").read_text())
    assert saved["gguf"] == str(result.gguf)
    assert not list(result.out_dir.parent.glob(".tmp-*")), "the temporary folder was renamed"
    fields = result.registry_fields()
    assert fields["gguf"]["quantization"] == "Q4_K_M"
    assert fields["lora_gguf"]["sha256"] == export.file_sha256(result.lora_gguf)


@pytest.mark.slow
def test_f16_copy_and_smoke_check_of_the_converted_base(
    base_f16_gguf: Path, tmp_path: Path
) -> None:
    """convert_to_gguf on the real dequantized default model; F16 'quantization' is a copy."""
    copy = export.quantize_gguf(base_f16_gguf, tmp_path / "copy.gguf", "F16")
    assert copy.read_bytes()[:4] == b"GGUF"
    assert copy.stat().st_size == base_f16_gguf.stat().st_size
    answer = export.smoke_check(copy, load=lambda path: smoke_chat_model(path, 2))
    assert "7" in answer, answer  # "7 years", from the context only


@pytest.mark.slow
def test_lora_gguf_loads_in_llama_cpp_and_matches_the_merge(
    exported: Any, base_f16_gguf: Path
) -> None:
    """The GGUF adapter applied at run time gives (up to f16 rounding) the merged model."""
    import numpy as np

    assert exported.lora_gguf is not None
    base = gguf_logits(base_f16_gguf)
    with_lora = gguf_logits(base_f16_gguf, exported.lora_gguf)
    merged = gguf_logits(exported.f16_gguf)
    changed = float(np.abs(with_lora - base).max())
    off = float(np.abs(with_lora - merged).max())
    assert changed > 0.1, "the adapter changes the output"
    assert off < changed / 5, (off, changed)


def test_lora_conversion_refuses_a_missing_converter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(export, "LORA_CONVERTER", tmp_path / "nowhere.py")
    with pytest.raises(ExportError, match="LoRA converter is missing"):
        export.convert_lora_to_gguf(base, adapter, tmp_path / "a.gguf")
