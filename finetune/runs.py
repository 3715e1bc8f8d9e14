"""A fine-tuning run from dataset to registered model: train, export, gate, register, activate.

A run is a folder under ``DATA/finetune/runs/RUN``. ``request.json`` says what to do (the
dataset and the resolved run config); ``state.json`` says how far it got. Every stage leaves
its output in the folder before the state moves on, so ``appliance finetune resume RUN``
continues a run that was stopped, killed or queued from the UI, skipping finished stages:

    queued ─► training ─► exporting ─► gating ─► activated | rejected
                 │ (stop: checkpoint)                       (failed: error kept in the state)
                 ▼
              stopped
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.core.errors import ApplianceError, ConfigError
from appliance.core.evaluation import GoldenItem, load_golden
from appliance.core.settings import Settings

if TYPE_CHECKING:
    from appliance.core.protocols import ChatModel
    from finetune.config import RunConfig
    from finetune.data import DatasetInfo
    from finetune.gate import GateReport, GoldenEvaluator
    from finetune.registry import ModelRegistry

log = logging.getLogger(__name__)

FINAL = ("activated", "rejected", "registered", "failed")


# --- the run folder --------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_dir(settings: Settings, run_id: str) -> Path:
    if not run_id or "/" in run_id or run_id.startswith(".") or "\\" in run_id:
        raise ConfigError(f"{run_id!r} is not a run id")
    folder = settings.runs_dir / run_id
    if not (folder / "request.json").is_file():
        raise ConfigError(f"no fine-tuning run {run_id!r} in {settings.runs_dir}")
    return folder


def state(folder: Path) -> dict[str, Any]:
    return _read_json(folder / "state.json") or {"status": "unknown"}


def _set_state(folder: Path, status: str, **extra: Any) -> dict[str, Any]:
    current = state(folder)
    current.update(extra, status=status, updated=time.time())
    current.setdefault("history", []).append({"status": status, "time": time.time()})
    _write_json(folder / "state.json", current)
    return current


def create_run(
    settings: Settings,
    dataset: str | Path,
    *,
    config_path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    requested_by: str = "local",
) -> Path:
    """A queued run: its folder with the request (dataset and resolved config)."""
    from finetune.config import load_run_config
    from finetune.data import load_dataset

    info = load_dataset(_dataset_path(settings, dataset))
    config = load_run_config(config_path, **(overrides or {}))
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
    folder = settings.runs_dir / run_id
    folder.mkdir(parents=True)
    _write_json(
        folder / "request.json",
        {
            "run": run_id,
            "dataset": str(info.path),
            "dataset_sha256": info.sha256,
            # the collections the dataset drew on; the model inherits them (None: unknown)
            "audience": info.audience,
            "config": config.model_dump(mode="json"),
            "requested_by": requested_by,
            "created": time.time(),
        },
    )
    _set_state(folder, "queued", run=run_id)
    return folder


def run_audience(folder: Path) -> list[str] | None:
    """The collections a run's dataset drew on (its request), None when unknown."""
    from appliance.core.audience import normalise

    request = _read_json(folder / "request.json")
    return normalise(request.get("audience")) if isinstance(request, dict) else None


def _dataset_path(settings: Settings, dataset: str | Path) -> Path:
    from finetune.data import DatasetError, dataset_path

    path = Path(dataset)
    if path.is_dir():
        return path
    try:
        named: Path | None = dataset_path(settings, str(dataset))
    except DatasetError:
        named = None  # a path, not a plain name
    if named is not None and named.is_dir():
        return named
    if named is None or path.suffix.lower() == ".jsonl":
        raise ConfigError(
            f"no file or folder {str(dataset)!r}: give a JSONL file of training pairs, a "
            "dataset folder, or a name from `appliance dataset list` (build one with "
            "`appliance dataset build`)"
        )
    raise ConfigError(
        f"no dataset {str(dataset)!r}: give a dataset folder or a name from "
        "`appliance dataset list` (build one with `appliance dataset build`)"
    )


def list_runs(settings: Settings) -> list[dict[str, Any]]:
    runs = []
    if settings.runs_dir.is_dir():
        for folder in sorted(settings.runs_dir.iterdir(), reverse=True):
            request = _read_json(folder / "request.json")
            if not isinstance(request, dict):
                continue
            progress = _read_json(folder / "progress.json") or {}
            current = state(folder)
            config = _read_json(folder / "config.json") or {}
            runs.append(
                {
                    "run": folder.name,
                    "status": current.get("status"),
                    "error": current.get("error"),
                    "version": current.get("version"),
                    "dataset": request.get("dataset"),
                    "audience": request.get("audience"),
                    "requested_by": request.get("requested_by"),
                    "created": request.get("created"),
                    "step": progress.get("step"),
                    "max_steps": progress.get("max_steps"),
                    "loss": progress.get("loss"),
                    # chosen (and measured) at the start of training: shown while it runs
                    "precision": config.get("precision") if isinstance(config, dict) else None,
                    "gate": current.get("gate"),
                    "loss_curve": str(folder / "loss.png")
                    if (folder / "loss.png").is_file()
                    else None,
                    "gate_report": str(folder / "gate" / "gate.html")
                    if (folder / "gate" / "gate.html").is_file()
                    else None,
                }
            )
    return runs


# --- the golden set, evaluated with a given GGUF ----------------------------------------------


def golden_items(settings: Settings, limit: int | None = None) -> list[GoldenItem]:
    path = settings.finetune.golden_path
    if path is None:
        return []
    if not path.is_file():
        raise ConfigError(f"finetune.golden_path {path} is not a file")
    return load_golden(path, limit)


# --- executing a run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunTools:
    """What a run needs from the application that starts it (``appliance.run_tools`` builds
    them): chat models for a GGUF, and the golden-set evaluation, which needs the index."""

    load_model: Callable[[Path], ChatModel]
    """A GGUF as the serving settings load it: the gate's reference and candidate."""
    load_smoke: Callable[[Path], ChatModel]
    """A GGUF in a small context: the export's smoke check."""
    golden_evaluator: GoldenEvaluator
    """The golden set answered with a GGUF (used when ``finetune.golden_path`` is set)."""


def execute(
    settings: Settings,
    folder: Path,
    *,
    tools: RunTools,
    progress: bool = True,
    stop: threading.Event | None = None,
    activate: bool = True,
    say: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Run (or continue) every stage of the run in ``folder``; the final state."""
    try:
        return _execute(settings, folder, tools, progress, stop, activate, say)
    except ApplianceError as exc:
        _set_state(folder, "failed", error=str(exc))
        raise
    except Exception as exc:  # a training or export library failing: keep the reason
        log.exception("fine-tuning run %s failed", folder.name)
        _set_state(folder, "failed", error=f"{type(exc).__name__}: {exc}")
        raise ApplianceError(f"fine-tuning run {folder.name} failed: {exc}") from exc


def _execute(
    settings: Settings,
    folder: Path,
    tools: RunTools,
    progress: bool,
    stop: threading.Event | None,
    activate: bool,
    say: Callable[[str], None],
) -> dict[str, Any]:
    from finetune.base_model import ensure_hf_base
    from finetune.config import RunConfig
    from finetune.data import load_dataset
    from finetune.export import folder_hashes
    from finetune.registry import registry_for

    request = _read_json(folder / "request.json")
    if not isinstance(request, dict):
        raise ConfigError(f"{folder} holds no readable request.json")
    current = state(folder)
    if current.get("status") in FINAL and current.get("status") != "failed":
        return current
    config = RunConfig.model_validate(request["config"])
    dataset = load_dataset(Path(request["dataset"]))
    registry = registry_for(settings)
    source = settings.finetune.base_model_path or Path(registry.get("base")["gguf"]["path"])

    # 1. train (or continue training)
    _set_state(folder, "training")
    say(f"run {folder.name}: base model {source.name}")
    base_dir = ensure_hf_base(source, settings.models_dir / "hf")
    result = _train(folder, dataset.path, config, base_dir, progress, stop, say)
    precision = result.get("precision")
    if result.get("status") == "stopped" or (stop is not None and stop.is_set()):
        return _set_state(folder, "stopped", train=result, precision=precision)
    if result.get("fallback_reason"):
        say(f"note: {result['fallback_reason']}")
    _set_state(folder, "exporting", train=result, precision=precision)

    # 2. merge, GGUF, quantize, smoke test, LoRA GGUF
    exported = _read_json(folder / "export.json")
    if not isinstance(exported, dict):
        import shutil

        from finetune.export import export_run

        say("merging the adapter, converting to GGUF, quantizing")
        shutil.rmtree(folder / "export", ignore_errors=True)  # a half-done earlier attempt
        outcome = export_run(
            Path(result["base_dir"]),
            Path(result["adapter_dir"]),
            folder / "export",
            settings.finetune.quantization,
            load=tools.load_smoke,
            n_threads=settings.chat.n_threads,
        )
        exported = {"result": outcome.as_json(), "registry": outcome.registry_fields()}
        _write_json(folder / "export.json", exported)
    for warning in exported["result"].get("warnings") or []:
        say(f"note: {warning}")

    # 3. gate against the serving model
    _set_state(folder, "gating")
    report = _gate(
        settings, folder, tools, registry, dataset, Path(exported["result"]["gguf"]), say
    )

    # 4. register with full lineage; activate only what passed
    record = {
        "run_id": folder.name,
        "parent": "base",
        "base_model": str(source),
        "dataset": str(dataset.path),
        "dataset_sha256": dataset.sha256,
        # who may be answered by it (appliance.core.audience); a dataset without one leaves it
        # unknown, and the version answers only the host's operators
        "audience": dataset.audience,
        "config": request["config"],
        "train": result,
        "adapter": folder_hashes(Path(result["adapter_dir"])),
        **exported["registry"],
        "gate": {
            "passed": report.passed,
            "failures": report.failures,
            "reference": report.reference,
            "metrics": report.metrics(),
            "report": str(folder / "gate" / "gate.html"),
        },
    }
    version = current.get("version") or registry.register(record)
    _set_state(folder, "registered", version=version, gate=record["gate"])
    if report.passed and activate:
        registry.activate(version)
        say(f"{version} passed the gate and is now active")
        return _set_state(folder, "activated", version=version)
    say(
        f"{version} is registered but not active: "
        + ("; ".join(report.failures) if report.failures else "activation was not requested")
    )
    return _set_state(folder, "rejected" if not report.passed else "registered", version=version)


def _train(
    folder: Path,
    dataset_dir: Path,
    config: RunConfig,
    base_dir: Path,
    progress: bool,
    stop: threading.Event | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    from finetune import train

    done = _read_json(folder / "result.json")
    if isinstance(done, dict) and done.get("status", "done") == "done":
        return done
    if (folder / "config.json").is_file():
        # Started before (stopped, killed or crashed): resume restarts from the newest
        # checkpoint, or from step 0 when there is none yet.
        outcome = train.resume(folder, progress=progress, stop=stop, say=say)
    else:
        outcome = train.train(
            folder, dataset_dir, config, base=base_dir, progress=progress, stop=stop, say=say
        )
    data = outcome.to_json()
    progress_state = _read_json(folder / "progress.json") or {}
    data.setdefault("status", progress_state.get("status", "done"))
    return data


def _gate(
    settings: Settings,
    folder: Path,
    tools: RunTools,
    registry: ModelRegistry,
    dataset: DatasetInfo,
    candidate: Path,
    say: Callable[[str], None],
) -> GateReport:
    from finetune.gate import run_gate, write_report

    active = registry.active()
    reference = (str(active["version"]), registry.verified_gguf(str(active["version"])))
    heldout = _jsonl(dataset.heldout_path)
    golden = golden_items(settings)
    report = run_gate(
        reference=reference,
        candidate=("candidate " + folder.name, candidate),
        load=tools.load_model,
        heldout=heldout,
        golden=golden,
        golden_evaluator=tools.golden_evaluator if golden else None,
        max_drop=settings.finetune.gate_max_drop,
        max_tokens=settings.chat.max_tokens,
        progress=say,
    )
    write_report(report, folder / "gate")
    return report


def _jsonl(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.is_file():
        return []
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
