"""The precision choice of ``run.quantization: auto``: timings in, choice out; the memory filter.

The measurement itself (a real model loaded and stepped) is the caller's; here it is a table of
step times, as the probe would report them on the CPUs of issue 11.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from appliance.core.errors import ConfigError, ModelError
from finetune.precision import (
    LORA_BF16,
    LORA_FP32,
    MIB,
    NF4_BF16,
    NF4_FP32,
    ModelShape,
    Precision,
    by_name,
    candidates,
    choose,
    decide,
    explicit,
    free_memory,
    memory_needed,
    model_shape,
    plan,
    summary,
)

# SmolLM2-135M: 30 layers of 576, a 49,152-token vocabulary (tied embeddings).
SMOLLM = ModelShape(
    quantizable_params=106_000_000,
    other_params=28_500_000,
    hidden_size=576,
    layers=30,
    vocab_size=49_152,
)
# Step times (s) as issue 11 measured them on a 2-core AVX2-only EPYC, and a Zen 4-like CPU.
AVX2_ONLY = {"nf4-bf16": 55.0, "nf4-fp32": 7.5, "lora-fp32": 5.6}
ZEN4 = {"nf4-bf16": 2.1, "nf4-fp32": 2.6, "lora-fp32": 2.3}
PLENTY = 64 << 30


def timings(table: dict[str, float]):  # type: ignore[no-untyped-def]
    calls: list[str] = []

    def measure(precision: Precision) -> tuple[float, float, float]:
        calls.append(precision.name)
        return 1.0, table[precision.name] * 1.5, table[precision.name]

    return measure, calls


def trials_for(device: str = "cpu", free: int | None = PLENTY, **kw: str):  # type: ignore[no-untyped-def]
    return plan(candidates(device), SMOLLM, free, 4, 512, kw or None)


# --- timings in, choice out ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "expected"),
    [(AVX2_ONLY, "lora-fp32"), (ZEN4, "nf4-bf16")],
    ids=["avx2-only", "zen4"],
)
def test_the_fastest_measured_candidate_is_chosen(table: dict[str, float], expected: str) -> None:
    measure, calls = timings(table)
    decision = decide(trials_for(), measure, device="cpu", free_bytes=PLENTY, batch_tokens=360)
    assert decision.chosen.name == expected
    assert calls == ["nf4-bf16", "nf4-fp32", "lora-fp32"]  # each candidate once, in order
    record = decision.to_json()
    assert record["chosen"] == expected
    assert record["requested"] == "auto"
    assert record["reason"] == "fastest of 3 measured candidates"
    assert {c["name"]: c["step_s"] for c in record["candidates"]} == table
    assert all(c["warmup_s"] and c["load_s"] == 1.0 for c in record["candidates"])
    assert record["batch_tokens"] == 360
    assert json.loads(json.dumps(record)) == record  # config.json-ready
    assert expected in summary(record)
    assert "55.00 s/step" in summary(
        decide(trials_for(), timings(AVX2_ONLY)[0], device="cpu").to_json()
    )


def test_a_tie_goes_to_the_first_listed_and_a_failed_trial_is_never_chosen() -> None:
    trials = trials_for()
    for trial, step in zip(trials, (3.0, 3.0, 1.0), strict=True):
        trial.step_s = step
    trials[2].error = "OutOfMemoryError: ..."
    assert choose(trials).precision is NF4_BF16

    def measure(precision: Precision) -> tuple[float, float, float]:
        if precision.compute_dtype == "bfloat16":
            raise RuntimeError("bf16 is not supported here")
        return 1.0, 2.0, {"nf4-fp32": 4.0, "lora-fp32": 3.0}[precision.name]

    decision = decide(trials_for(), measure, device="cpu")
    assert decision.chosen is LORA_FP32
    failed = decision.to_json()["candidates"][0]
    assert failed["step_s"] is None
    assert "bf16 is not supported" in failed["error"]
    assert decision.reason == "fastest of 2 measured candidates"


def test_nothing_measurable_is_an_error_naming_each_reason() -> None:
    def broken(precision: Precision) -> tuple[float, float, float]:
        raise RuntimeError(f"{precision.name} broke")

    with pytest.raises(ModelError, match=r"nf4-bf16: .*no NF4.*lora-fp32: RuntimeError"):
        decide(trials_for(**{"nf4-bf16": "no NF4", "nf4-fp32": "no NF4"}), broken, device="cpu")


# --- the memory filter --------------------------------------------------------------------------


def test_memory_decides_only_what_is_tried() -> None:
    need = {p.name: memory_needed(SMOLLM, p, 4, 512) for p in candidates("cpu")}
    assert need["nf4-bf16"] < need["lora-fp32"]
    # Room for NF4 but not for the fp32 base: plain LoRA is skipped, with the numbers.
    free = (need["nf4-fp32"] + need["lora-fp32"]) // 2
    measure, calls = timings(AVX2_ONLY)
    decision = decide(trials_for(free=free), measure, device="cpu", free_bytes=free)
    assert calls == ["nf4-bf16", "nf4-fp32"]
    assert decision.chosen is NF4_FP32  # the fastest of what fits, not the fastest overall
    skipped = decision.to_json()["candidates"][2]
    assert skipped["fits"] is False
    assert skipped["skipped"].startswith(f"needs about {need['lora-fp32'] / MIB:.0f} MiB")
    assert skipped["step_s"] is None
    assert decision.free_mb == round(free / MIB)


def test_when_nothing_fits_the_smallest_is_tried_anyway() -> None:
    trials = trials_for(free=10 * MIB)
    tried = [t.precision.name for t in trials if t.skipped is None]
    assert tried == ["nf4-bf16"]  # the smallest estimate (bf16 activations)
    assert not any(t.fits for t in trials)
    # Unknown free memory: everything is tried.
    assert all(t.skipped is None for t in trials_for(free=None))


def test_candidates_unavailable_here_are_skipped_with_the_reason() -> None:
    reason = "bitsandbytes cannot quantize to NF4 on cpu"
    measure, calls = timings(ZEN4)
    decision = decide(trials_for(**{"nf4-bf16": reason, "nf4-fp32": reason}), measure, device="cpu")
    assert calls == ["lora-fp32"]
    assert decision.chosen is LORA_FP32
    assert [c["skipped"] for c in decision.to_json()["candidates"]] == [reason, reason, None]


def test_estimates_scale_with_precision_batch_and_sequence() -> None:
    fp32 = memory_needed(SMOLLM, LORA_FP32, 4, 512)
    assert memory_needed(SMOLLM, LORA_BF16, 4, 512) < fp32
    assert memory_needed(SMOLLM, NF4_BF16, 4, 512) < memory_needed(SMOLLM, NF4_FP32, 4, 512)
    assert memory_needed(SMOLLM, LORA_FP32, 8, 512) > fp32
    # About 0.5 GiB of fp32 weights and a 4 x 512 x 49k logits tensor: a few GiB, not tens.
    assert 1 << 30 < fp32 < 6 << 30


def test_model_shape_is_read_from_safetensors_headers(tmp_path: Path) -> None:
    tensors = {
        "model.embed_tokens.weight": [100, 8],
        "model.layers.0.self_attn.q_proj.weight": [8, 8],
        "model.layers.0.mlp.up_proj.weight": [16, 8],
        "model.layers.0.input_layernorm.weight": [8],
    }
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4
        for n in shape:
            size *= n
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    config = {"hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 100}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = model_shape(tmp_path)
    assert (shape.quantizable_params, shape.other_params) == (64 + 128, 800 + 8)
    assert (shape.hidden_size, shape.layers, shape.vocab_size) == (8, 1, 100)


def test_free_memory_on_this_machine() -> None:
    free = free_memory("cpu")
    assert free is not None
    assert free > 64 * MIB


# --- devices and names --------------------------------------------------------------------------


def test_candidates_and_modes_per_device() -> None:
    assert candidates("cpu") == (NF4_BF16, NF4_FP32, LORA_FP32)
    assert candidates("cuda") == (NF4_BF16, NF4_FP32, LORA_BF16)
    assert [p.mode("cpu") for p in candidates("cpu")] == [
        "qlora-nf4",
        "qlora-nf4-fp32",
        "lora-fp32",
    ]
    assert [p.mode("cuda") for p in candidates("cuda")] == [
        "qlora-nf4-cuda",
        "qlora-nf4-fp32-cuda",
        "lora-bf16-cuda",
    ]
    # VRAM decides on CUDA: with 2.5 GiB free only NF4 with bf16 compute fits this batch.
    cuda = plan(candidates("cuda"), SMOLLM, 2550 * MIB, 4, 512)
    assert [t.skipped is None for t in cuda] == [True, False, False]


def test_explicit_choices_are_obeyed() -> None:
    assert explicit("nf4", "cpu") is NF4_BF16
    assert explicit("nf4", "cuda") is NF4_BF16
    assert explicit("none", "cpu") is LORA_FP32
    assert explicit("none", "cuda") is LORA_BF16
    with pytest.raises(ConfigError, match="measurement"):
        explicit("auto", "cpu")
    assert by_name("nf4-fp32") is NF4_FP32
    with pytest.raises(ConfigError, match="known"):
        by_name("int8")
