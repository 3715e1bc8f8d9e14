"""``appliance finetune``: start, resume, stop and list fine-tuning runs."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from appliance.core.errors import ApplianceError
from appliance.core.settings import Settings

EXIT_ERROR = 1
EXIT_REJECTED = 4  # as `appliance eval`'s gate


def add_commands(sub: Any) -> None:  # argparse._SubParsersAction
    p = sub.add_parser(
        "finetune",
        help="fine-tune the chat model on a dataset: train, gate, export, register",
        description="appliance finetune --dataset D [--config run.yaml] [--max-steps N]; "
        "appliance finetune resume RUN; appliance finetune list; appliance finetune stop RUN",
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=["run", "resume", "list", "stop"],
        default="run",
        help="run (default): start a run; resume RUN: continue a stopped, failed or queued "
        "run; list: the runs; stop RUN: ask a running run to stop at its next step",
    )
    p.add_argument("run", nargs="?", help="the run id (resume, stop)")
    p.add_argument(
        "--dataset",
        help="a dataset name (appliance dataset list), a dataset folder, or a JSONL file of "
        "training pairs (built into a dataset named after the file first, as `appliance "
        "dataset build --from FILE` builds it)",
    )
    # dest differs from the global --config (the settings file), which comes before the command:
    # appliance --config settings.yaml finetune --dataset D --config run.yaml
    p.add_argument(
        "--config",
        dest="run_config",
        type=Path,
        help="YAML run config (LoRA, schedule, steps, ...)",
    )
    p.add_argument("--max-steps", type=int, help="training steps (overrides the run config)")
    p.add_argument(
        "--no-activate", action="store_true", help="register the model but do not activate it"
    )
    p.add_argument("--json", action="store_true", help="print the final state as JSON")
    p.set_defaults(func=cmd_finetune, log_file=True)


@contextmanager
def _one_run_at_a_time(settings: Settings) -> Iterator[None]:
    """Two runs at once would share the CPU (or GPU) and memory and both crawl."""
    settings.runs_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(settings.runs_dir.parent / "run.lock", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            raise ApplianceError(
                f"another fine-tuning run is in progress ({holder or 'unknown'}); "
                "wait for it or stop it with `appliance finetune stop RUN`"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)


@contextmanager
def _stop_event(folder: Path) -> Iterator[threading.Event]:
    """Set on SIGTERM/SIGINT or when a ``stop`` file appears in the run folder (the UI's and
    ``appliance finetune stop``'s way to reach a run in another process). The previous signal
    handlers are back on exit: a run started in a longer-lived process (a test run, a notebook)
    must not leave Ctrl-C, or a forked child's SIGTERM, setting a dead run's event."""
    stop = threading.Event()
    over = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    (folder / "stop").unlink(missing_ok=True)

    def watch() -> None:
        while not over.is_set() and not stop.wait(1.0):
            if (folder / "stop").exists():
                stop.set()

    threading.Thread(target=watch, name="finetune-stop", daemon=True).start()
    try:
        yield stop
    finally:
        over.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_finetune(args: argparse.Namespace, settings: Settings) -> int:
    from finetune import runs

    if args.action == "list":
        listing = runs.list_runs(settings)
        if args.json:
            print(json.dumps(listing, indent=1, ensure_ascii=False))
            return 0
        for run in listing:
            step = f"{run['step']}/{run['max_steps']}" if run.get("max_steps") else ""
            print(f"{run['run']}  {run['status']:10s} {step:9s} {run.get('version') or ''}")
        return 0
    if args.action == "stop":
        if not args.run:
            raise ApplianceError("name the run to stop: appliance finetune stop RUN")
        (runs.run_dir(settings, args.run) / "stop").touch()
        print(f"asked run {args.run} to stop after its current step")
        return 0
    if args.action == "resume":
        if not args.run:
            raise ApplianceError("name the run to resume: appliance finetune resume RUN")
        folder = runs.run_dir(settings, args.run)
    quiet = args.json or not sys.stderr.isatty()

    def say(message: str) -> None:
        if not args.json:
            print(message, file=sys.stderr, flush=True)

    built: dict[str, Any] | None = None
    if args.action == "run":
        if not args.dataset:
            raise ApplianceError("say which dataset to train on: --dataset NAME_OR_FOLDER_OR_FILE")
        dataset: str | Path = args.dataset
        if Path(args.dataset).is_file():
            from finetune.dataset import dataset_from_file

            made = dataset_from_file(settings, Path(args.dataset))
            say(made.message())
            built, dataset = made.summary(), made.info.path
        overrides = {"max_steps": args.max_steps} if args.max_steps else {}
        folder = runs.create_run(
            settings, dataset, config_path=args.run_config, overrides=overrides
        )

    from appliance.core.audit import local_identity, open_audit_log

    with (
        _one_run_at_a_time(settings),
        open_audit_log(settings) as audit,
        _stop_event(folder) as stop,
    ):
        operator = local_identity()
        audit.record("finetune", operator, action=args.action, run=folder.name)
        say(f"fine-tuning run {folder.name}")
        from appliance.run_tools import run_tools

        final = runs.execute(
            settings,
            folder,
            tools=run_tools(settings),
            progress=not quiet,
            stop=stop,
            activate=not args.no_activate,
            say=say,
        )
        audit.record(
            "finetune",
            operator,
            action="finished",
            run=folder.name,
            status=final.get("status"),
            version=final.get("version"),
        )
    if built is not None:
        final = {**final, "dataset_built": built}
    if args.json:
        print(json.dumps(final, indent=1, ensure_ascii=False, default=str))
    else:
        print(f"{folder.name}: {final.get('status')} {final.get('version') or ''}".rstrip())
    if final.get("status") == "rejected":
        return EXIT_REJECTED
    return 0 if final.get("status") in ("activated", "registered", "stopped") else EXIT_ERROR
