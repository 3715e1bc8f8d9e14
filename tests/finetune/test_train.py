"""QLoRA training: assistant-only labels, real tiny runs, stop/resume, the LoRA fallback, DPO."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from appliance.core.errors import ConfigError, ModelError
from finetune.batches import IGNORE_INDEX, collate, tokenize_conversation
from finetune.config import ALL_PROJECTIONS, load_run_config
from finetune.run_folder import RunResult
from finetune.train import resume, train
from tests.finetune.conftest import write_dataset
from tests.finetune.format_data import adherence, make_format_records

HR = [
    {"role": "system", "content": "Answer from the policy."},
    {"role": "user", "content": "How many days of leave? [HR-1] Staff get 6 days."},
    {"role": "assistant", "content": "Answer 6.\nRef: HR-1"},
]
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "First question?"},
    {"role": "assistant", "content": "First answer."},
    {"role": "user", "content": "Second question?"},
    {"role": "assistant", "content": "Second answer."},
]
# Tiny and fast: 2 sequences of about 90 tokens per step.
TINY = {"batch_size": 2, "max_seq_len": 128, "save_every": 100, "threads": 2}


def unmasked(tokenizer: Any, batch: dict[str, Any], row: int) -> str:
    labels = batch["labels"][row]
    return str(tokenizer.decode(labels[labels != IGNORE_INDEX]))


# --- config -----------------------------------------------------------------------------------


def test_run_config_defaults_yaml_and_overrides(tmp_path: Path) -> None:
    config = load_run_config(None)
    assert (config.lora_r, config.lora_alpha, config.lora_dropout) == (16, 32, 0.05)
    assert config.target_modules == list(ALL_PROJECTIONS)
    assert config.quantization == "auto"  # measured at the start of the run
    assert config.gradient_checkpointing
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 40\nlearning_rate: 0.001\n", encoding="utf-8")
    config = load_run_config(path, max_steps=12)
    assert (config.max_steps, config.learning_rate) == (12, 0.001)
    path.write_text("max_stepz: 40\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="max_stepz"):
        load_run_config(path)


# --- labels -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_only_assistant_text_and_end_token_are_trained(hf_tokenizer: Any) -> None:
    examples = [tokenize_conversation(hf_tokenizer, m, 256) for m in (HR, MULTI)]
    assert all(e is not None for e in examples)
    batch = collate([e for e in examples if e is not None], hf_tokenizer.pad_token_id)

    assert unmasked(hf_tokenizer, batch, 0).rstrip("\n") == "Answer 6.\nRef: HR-1<|im_end|>"
    multi = unmasked(hf_tokenizer, batch, 1)
    assert multi.replace("\n", "") == "First answer.<|im_end|>Second answer.<|im_end|>"
    for row, messages in enumerate((HR, MULTI)):
        trained = unmasked(hf_tokenizer, batch, row)
        for message in messages:
            if message["role"] != "assistant":
                assert message["content"] not in trained
        assert "assistant" not in trained  # no template scaffolding
    # Padding is never trained.
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


@pytest.mark.slow
def test_truncation_keeps_the_prompt_tail_and_skips_what_cannot_fit(hf_tokenizer: Any) -> None:
    long_prompt = [
        {"role": "user", "content": "filler " * 300 + "The question at the end?"},
        {"role": "assistant", "content": "The answer."},
    ]
    example = tokenize_conversation(hf_tokenizer, long_prompt, 64)
    assert example is not None
    assert len(example.input_ids) == 64
    text = hf_tokenizer.decode(example.input_ids)
    assert "The question at the end?" in text
    assert text.rstrip("\n").endswith("The answer.<|im_end|>")
    long_answer = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "a " * 200}]
    assert tokenize_conversation(hf_tokenizer, long_answer, 64) is None


def test_a_template_that_is_not_prefix_preserving_is_refused() -> None:
    class Rewriting:
        """A template that renders the last turn differently from earlier ones."""

        def apply_chat_template(
            self, messages: list[dict[str, str]], tokenize: bool, add_generation_prompt: bool
        ) -> str:
            body = "".join(f"<{m['role']}>{m['content']}" for m in messages)
            return f"{len(messages)}:{body}" + ("<assistant>" if add_generation_prompt else "")

    with pytest.raises(ModelError, match="prefix"):
        tokenize_conversation(Rewriting(), HR, 128)


def test_format_data_and_adherence() -> None:
    records = make_format_records(5, seed=3)
    assert records == make_format_records(5, seed=3)
    for record in records:
        answer = record["messages"][-1]["content"]
        assert adherence(answer, record["file"])
        assert record["file"] in record["messages"][1]["content"]
    assert not adherence("Kept for 3 years.", records[0]["file"])
    assert not adherence(f"Source: {records[0]['file']}\nMore text.", records[0]["file"])


# --- real runs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("dataset"), make_format_records(8, seed=1))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, dataset: Path, hf_base: Path) -> RunResult:
    """Three uninterrupted QLoRA steps on the real default model."""
    config = load_run_config(None, max_steps=3, quantization="nf4", **TINY)
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    return train(run_dir, dataset, config, base=hf_base, progress=False)


def loss_records(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "loss.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.slow
def test_a_tiny_qlora_run_writes_every_artifact(full_run: RunResult, dataset: Path) -> None:
    run_dir = full_run.run_dir
    assert full_run.status == "done"
    assert full_run.steps == 3
    assert full_run.mode == "qlora-nf4"
    assert full_run.fallback_reason is None
    assert full_run.final_loss is not None
    assert full_run.final_loss > 0
    assert full_run.train_tokens > 0
    assert full_run.tokens_per_s > 0
    assert full_run.adapter_dir == run_dir / "adapter"
    adapter_files = {p.name for p in full_run.adapter_dir.iterdir()}
    assert "adapter_model.safetensors" in adapter_files
    assert "adapter_config.json" in adapter_files
    assert not [name for name in adapter_files if name.endswith((".bin", ".pt", ".pkl"))]
    assert [r["step"] for r in loss_records(run_dir)] == [1, 2, 3]
    assert (run_dir / "loss.png").read_bytes().startswith(b"\x89PNG")
    progress = json.loads((run_dir / "progress.json").read_text(encoding="utf-8"))
    assert progress["status"] == "done"
    assert (progress["step"], progress["max_steps"]) == (3, 3)
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    assert config["run"]["max_steps"] == 3
    assert config["precision"]["requested"] == "nf4"  # named: obeyed, nothing measured
    assert config["precision"]["chosen"] == "nf4-bf16"
    assert config["precision"]["candidates"] == []
    assert full_run.precision == config["precision"]
    assert config["dataset_sha256"] == "test-8"
    assert Path(config["base"]) == full_run.base_dir.resolve()
    versions = json.loads((run_dir / "versions.json").read_text(encoding="utf-8"))
    assert versions["device"] == "cpu"
    assert versions["peft"]
    result = RunResult.from_json(json.loads((run_dir / "result.json").read_text("utf-8")))
    assert result == full_run
    # A finished run resumes to its result without training.
    assert resume(run_dir, progress=False) == full_run
    with pytest.raises(ConfigError, match="not empty"):
        train(run_dir, dataset, load_run_config(None), base=full_run.base_dir, progress=False)


@pytest.mark.slow
def test_stop_after_one_step_then_resume_continues_the_schedule(
    tmp_path: Path, dataset: Path, hf_base: Path, full_run: RunResult
) -> None:
    config = load_run_config(None, max_steps=3, quantization="nf4", **TINY)
    run_dir = tmp_path / "stopped"
    stop = threading.Event()
    stop.set()  # checked after each step: the run stops after its first
    stopped = train(run_dir, dataset, config, base=hf_base, progress=False, stop=stop)
    assert (stopped.status, stopped.steps, stopped.adapter_dir) == ("stopped", 1, None)
    progress = json.loads((run_dir / "progress.json").read_text(encoding="utf-8"))
    assert (progress["status"], progress["step"]) == ("stopped", 1)
    assert (run_dir / "checkpoints" / "step-1" / "adapter_model.safetensors").is_file()

    resumed = resume(run_dir, progress=False)
    assert (resumed.status, resumed.steps) == ("done", 3)
    assert resumed.adapter_dir is not None
    assert (resumed.adapter_dir / "adapter_model.safetensors").is_file()
    records, reference = loss_records(run_dir), loss_records(full_run.run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    # Same schedule and same data position as the uninterrupted run.
    assert [r["lr"] for r in records] == [r["lr"] for r in reference]
    assert [r["tokens"] for r in records] == [r["tokens"] for r in reference]
    for ours, theirs in zip(records, reference, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=0.02)
    assert resumed.train_tokens == full_run.train_tokens
    # Only the newest checkpoints are kept.
    assert len(list((run_dir / "checkpoints").iterdir())) <= config.keep_checkpoints


@pytest.mark.slow
def test_auto_times_each_candidate_records_the_choice_and_a_resume_keeps_it(
    tmp_path: Path, dataset: Path, hf_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import finetune.train as train_module
    from finetune.precision import by_name

    config = load_run_config(None, max_steps=2, quantization="auto", **{**TINY, "batch_size": 1})
    heard: list[str] = []
    stop = threading.Event()
    stop.set()  # one step, then a resume
    run_dir = tmp_path / "auto"
    stopped = train(
        run_dir, dataset, config, base=hf_base, progress=False, stop=stop, say=heard.append
    )
    precision = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["precision"]
    assert precision["requested"] == "auto"
    assert precision["device"] == "cpu"
    steps = {c["name"]: c["step_s"] for c in precision["candidates"]}
    assert list(steps) == ["nf4-bf16", "nf4-fp32", "lora-fp32"]
    assert all(step is not None and step > 0 for step in steps.values()), precision
    assert all(c["warmup_s"] > 0 and c["fits"] for c in precision["candidates"])
    assert precision["chosen"] == min(steps, key=lambda name: steps[name])
    assert precision["batch_tokens"] > 0
    assert stopped.precision == precision
    assert stopped.mode == by_name(precision["chosen"]).mode("cpu") == precision["mode"]
    assert any(line.startswith(f"precision {precision['chosen']}") for line in heard)

    def measured_again(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a resumed run measured its precision again")

    monkeypatch.setattr(train_module, "measure_precision", measured_again)
    resumed = resume(run_dir, progress=False)
    assert (resumed.status, resumed.steps) == ("done", 2)
    assert resumed.precision == precision
    assert resumed.mode == stopped.mode


@pytest.mark.slow
def test_without_bitsandbytes_it_falls_back_to_lora_and_says_so_then_runs_dpo(
    tmp_path: Path, hf_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import finetune.modeling as modeling_module

    monkeypatch.setattr(
        modeling_module, "bnb_unavailable_reason", lambda device: "bitsandbytes forced off"
    )
    records = make_format_records(4, seed=2)
    preferences = [
        {
            "prompt": r["messages"][:2],
            "chosen": r["messages"][2]["content"],
            "rejected": r["messages"][2]["content"].split("\n")[0],
        }
        for r in records
    ]
    dataset = write_dataset(tmp_path / "ds", records, preferences)
    config = load_run_config(None, max_steps=1, quantization="nf4", dpo=True, dpo_steps=2, **TINY)
    result = train(tmp_path / "run", dataset, config, base=hf_base, progress=False)
    assert result.mode == "lora-fp32"
    assert result.fallback_reason == "bitsandbytes forced off"
    precision = json.loads((result.run_dir / "config.json").read_text())["precision"]
    assert precision["requested"] == "nf4"
    assert precision["chosen"] == "lora-fp32"  # what really trained
    assert "bitsandbytes forced off" in precision["reason"]
    saved = json.loads((result.run_dir / "result.json").read_text(encoding="utf-8"))
    assert saved["fallback_reason"] == "bitsandbytes forced off"
    assert result.dpo_steps == 2
    assert result.dpo_final_loss is not None
    assert result.dpo_final_loss > 0
    dpo = [r for r in loss_records(result.run_dir) if r.get("phase") == "dpo"]
    assert [r["step"] for r in dpo] == [2, 3]
    assert result.adapter_dir is not None
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


# --- base model -------------------------------------------------------------------------------


@pytest.mark.slow
def test_ensure_hf_base_is_idempotent_and_passes_folders_through(
    hf_base: Path, tmp_path: Path
) -> None:
    from appliance.core.chat_settings import default_chat_model_path
    from finetune.base_model import ensure_hf_base

    assert hf_base.name.startswith("base-")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in hf_base.iterdir()
    }
    assert ensure_hf_base(default_chat_model_path(), hf_base.parent) == hf_base
    assert ensure_hf_base(hf_base, tmp_path) == hf_base
    with pytest.raises(ModelError, match="neither"):
        ensure_hf_base(tmp_path / "model.bin", tmp_path)
