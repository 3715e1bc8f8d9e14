"""Supervised fine-tuning (QLoRA or LoRA) and optional DPO, with our own loop on peft.

Why our own loop: trl's ``SFTTrainer`` took about twice as long per step as a bare peft loop on
the same batches here (docs/facts.md); the loop below is that bare loop plus bookkeeping
(``benchmarks/finetune_throughput.py`` measures the difference).

The run folder's files are described in ``finetune.run_folder``; tokenization with
assistant-only labels and the data order in ``finetune.batches``; loading the model in its
precision in ``finetune.modeling``. With the optimizer, scheduler and RNG states restored from
a checkpoint, a resumed run follows the same schedule as an uninterrupted one.

DPO (``config.dpo``) is implemented here rather than with trl's ``DPOTrainer``: that trainer
rests on the same ``Trainer`` machinery measured twice as slow for SFT, and it needs its own
dataset processing; the loss itself is a few lines. The reference model is the SFT adapter's
base with the adapter disabled (``model.disable_adapter()``), so no second copy is loaded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance.core.errors import ConfigError
from finetune.audience import dataset_audience
from finetune.base_model import is_hf_folder
from finetune.batches import (
    IGNORE_INDEX,
    Example,
    batch_indices,
    collate,
    load_preference_pairs,
    load_sft_examples,
)
from finetune.config import RunConfig
from finetune.curves import plot_loss
from finetune.data import TRAIN, dataset_sha256, recorded_sha256_matches
from finetune.modeling import (
    import_training_stack,
    load_adapter_weights,
    load_model,
    load_tokenizer,
    measure_precision,
    pick_device,
    trainable,
)
from finetune.precision import Decision, Precision, by_name, summary
from finetune.precision import explicit as explicit_precision
from finetune.run_folder import (
    RUN_BOOKKEEPING,
    RunResult,
    base_digest,
    checkpoints,
    peak_rss_mb,
    versions,
    write_json_atomic,
)

log = logging.getLogger(__name__)


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

        import_training_stack()
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
            write_json_atomic(self.run_dir / "config.json", self.meta)
        self.optimizer = torch.optim.AdamW(
            trainable(self.model),
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
        write_json_atomic(self.run_dir / "config.json", self.meta)
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
        write_json_atomic(
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
        write_json_atomic(tmp / "state.json", asdict(self.state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in checkpoints(self.run_dir)[: -self.config.keep_checkpoints]:
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
            peak_rss_mb=peak_rss_mb(),
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
        torch.nn.utils.clip_grad_norm_(trainable(self.model), config.max_grad_norm)
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
        write_json_atomic(self.run_dir / "result.json", result.to_json())
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
        write_json_atomic(self.run_dir / "result.json", result.to_json())
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
        optimizer = torch.optim.AdamW(trainable(self.model), lr=config.dpo_learning_rate)
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
            torch.nn.utils.clip_grad_norm_(trainable(self.model), config.max_grad_norm)
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
    if not (dataset_dir / TRAIN).is_file():
        raise ConfigError(f"dataset folder {dataset_dir} has no {TRAIN}")
    # The run's own bookkeeping (finetune.runs: request, state, log, stop) may be there already.
    if run_dir.exists() and any(p.name not in RUN_BOOKKEEPING for p in run_dir.iterdir()):
        raise ConfigError(f"run folder {run_dir} is not empty; resume it or choose a new one")
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "run": config.model_dump(mode="json"),
        "base": str(base.resolve()),
        "base_sha256": base_digest(base),
        "dataset_dir": str(dataset_dir.resolve()),
        "dataset_sha256": dataset_sha256(dataset_dir),
        "audience": dataset_audience(dataset_dir),  # the collections it learns from
        "created": time.time(),
    }
    write_json_atomic(run_dir / "config.json", meta)
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
    if not recorded_sha256_matches(dataset_dir, meta["dataset_sha256"]):
        raise ConfigError(
            f"the dataset {dataset_dir} changed since run {run_dir} started; start a new run"
        )
    found = checkpoints(run_dir)
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
        write_json_atomic(run_dir / "versions.json", versions(session.device))
        return session.run()
    except BaseException as exc:
        # KeyboardInterrupt too: a UI polling progress.json must not show "running" forever.
        write_json_atomic(
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
