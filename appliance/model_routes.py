"""The core service's admin routes for models and fine-tuning runs.

Fine-tuning runs in its own process (``appliance finetune resume RUN``: a systemd oneshot
``appliance-finetune@RUN`` when the appliance runs under systemd, a child process otherwise), so
a run never competes with answering inside the service and survives a UI restart. The service
only queues runs, lists them, serves their loss curves and gate reports, and evaluates a
candidate GGUF on the golden set for the gate, because it owns the index that needs.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.api import Raw, Request
from appliance.core.errors import AccessDenied, ApplianceError, ConfigError

if TYPE_CHECKING:
    from appliance.service import CoreService, Identity

log = logging.getLogger(__name__)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def launch_run(service: CoreService, run_id: str) -> str:
    """Start ``appliance finetune resume RUN`` outside the service; how it was started."""
    settings = service.settings
    unit = Path("/etc/systemd/system/appliance-finetune@.service")
    if os.environ.get("INVOCATION_ID") and unit.is_file() and shutil.which("systemctl"):
        # Under systemd the run gets its own unit: its own limits, journal and restart policy.
        subprocess.run(
            ["systemctl", "start", "--no-block", f"appliance-finetune@{run_id}.service"],
            check=True,
            timeout=30,
        )
        return f"systemd unit appliance-finetune@{run_id}"
    folder = settings.runs_dir / run_id
    env = dict(os.environ, APPLIANCE_DATA_DIR=str(settings.data_dir))
    with (folder / "run.log").open("ab") as log_file:
        subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "finetune", "resume", run_id],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a service restart does not kill the run
        )
    return "child process"


def model_routes(service: CoreService) -> dict[tuple[str, str], Callable[[Request], Any]]:
    admin = service.as_admin
    settings = service.settings

    def models(_who: Identity, _body: dict[str, Any]) -> dict[str, Any]:
        return dict(service.local.models())

    def activate(who: Identity, body: dict[str, Any]) -> dict[str, Any]:
        result = service.local.activate_model(
            str(body.get("version", "")),
            force=bool(body.get("force")),
            rollback=bool(body.get("rollback")),
            operator=str(body.get("operator") or ""),
            who=who,
        )  # audited there, with the previous version and the GGUF's hash
        return dict(result)

    def runs(_who: Identity, _body: dict[str, Any]) -> dict[str, Any]:
        from finetune.data import list_datasets
        from finetune.runs import list_runs

        datasets = [d.summary() for d in list_datasets(settings)]
        return {"runs": list_runs(settings), "datasets": datasets}

    def start(who: Identity, body: dict[str, Any]) -> dict[str, Any]:
        from finetune.runs import create_run

        overrides: dict[str, Any] = {}
        if body.get("max_steps"):
            overrides["max_steps"] = int(body["max_steps"])
        folder = create_run(
            settings, str(body.get("dataset", "")), overrides=overrides, requested_by=who.username
        )
        how = launch_run(service, folder.name)
        service.audit_event("finetune", who.username, action="start", run=folder.name, how=how)
        return {"run": folder.name, "started": how}

    def stop(who: Identity, body: dict[str, Any]) -> dict[str, Any]:
        from finetune.runs import run_dir

        folder = run_dir(settings, str(body.get("run", "")))
        (folder / "stop").touch()
        service.audit_event("finetune", who.username, action="stop", run=folder.name)
        return {"run": folder.name, "stopping": True}

    def run_file(who: Identity, body: dict[str, Any]) -> Raw:
        from appliance.core.audience import may_use
        from finetune.runs import run_audience, run_dir

        folder = run_dir(settings, str(body.get("run", "")))
        kind = body.get("kind")
        files = {
            "loss": (folder / "loss.png", "image/png"),
            "gate": (folder / "gate" / "gate.html", "text/html; charset=utf-8"),
            "log": (folder / "run.log", "text/plain; charset=utf-8"),
        }
        if kind not in files:
            raise ConfigError(f"kind must be one of {sorted(files)}")
        path, content_type = files[str(kind)]
        if kind == "gate":
            # The gate report quotes held-out records: text of the run's collections. Admins
            # obey their grants here as in search, and each such read is audited.
            audience = run_audience(folder)
            if not may_use(None if audience is None else frozenset(audience), who.collections):
                service.audit_event(
                    "access_denied", who.username, route="finetune_gate_report", run=folder.name
                )
                raise AccessDenied(
                    "this run's gate report quotes documents of collections you are not "
                    "granted; ask for a grant of every collection it was trained on"
                )
        if not path.is_file():
            raise ConfigError(f"run {folder.name} has no {kind} file yet")
        if kind == "gate":
            service.audit_event("admin", who.username, action="gate_report_read", run=folder.name)
        return Raw(path.read_bytes(), content_type, path.name)

    def evaluate(who: Identity, body: dict[str, Any]) -> dict[str, Any]:
        from appliance.core.evaluation import GoldenItem

        if service.answerer is None:
            raise ApplianceError("this service has no answering engine to evaluate with")
        gguf = Path(str(body.get("gguf", "")))
        # Only models the appliance produced or registered: never an arbitrary file.
        if not gguf.is_file() or not _inside(gguf, settings.data_dir):
            raise ConfigError("gguf must be a model file inside the data folder")
        items = [
            GoldenItem(
                id=str(i["id"]),
                question=str(i["question"]),
                answer=str(i.get("answer", "")),
                evidence=tuple(i.get("evidence", ())),
            )
            for i in body.get("items", [])
        ]
        # Admins obey their grants here too: the golden questions search only what they may
        # read (the host's operator, as for every route without a session, searches all).
        service.audit_event(
            "admin", who.username, action="finetune_evaluate", target=gguf.name, items=len(items)
        )
        return service.local.evaluate(gguf, items, who=who)

    return {
        ("GET", "/admin/models"): admin(models),
        ("POST", "/admin/models/activate"): admin(activate),
        ("GET", "/admin/finetune/runs"): admin(runs),
        ("POST", "/admin/finetune/start"): admin(start),
        ("POST", "/admin/finetune/stop"): admin(stop),
        ("POST", "/admin/finetune/file"): admin(run_file),
        ("POST", "/admin/finetune/evaluate"): admin(evaluate),
    }
