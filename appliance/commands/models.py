"""``appliance models ...``: list, activate and roll back model versions; export to Ollama.

``list``, ``activate`` and ``rollback`` go through the data folder's appliance
(``wiring.connect``): the running core service when there is one (its model follows at once),
else the registry file in this process (shared under a lock; a service started later serves the
new active version). Activations and rollbacks are audited where they are made, like account
changes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from appliance.core.settings import Settings


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")


def _operator() -> str:
    from appliance.core.audit import local_identity

    return local_identity()


def _fmt_metrics(metrics: Any) -> str:
    if not isinstance(metrics, dict):
        return "-"
    cand = metrics.get("candidate", metrics)
    if not isinstance(cand, dict):
        return "-"
    parts = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in cand.items()]
    return " ".join(parts[:4]) or "-"


def _active(versions: list[dict[str, Any]]) -> str | None:
    return next((str(v["version"]) for v in versions if v["active"]), None)


def cmd_models_list(args: argparse.Namespace, settings: Settings) -> int:
    from appliance.wiring import connect

    with connect(settings, role="appliance models") as appliance:
        versions = appliance.model_versions()
    if args.json:
        _print_json(versions)
        return 0
    for v in versions:
        mark = "*" if v["active"] else " "
        gate = {True: "passed", False: "FAILED", None: "-"}[v.get("gate_passed")]
        quant = v["gguf_file"].get("quantization") or "?"
        print(
            f"{mark} {v['version']:6s} {quant:7s} gate {gate:6s} {_fmt_metrics(v['metrics'])}"
            f"  {v['gguf']}"
        )
    return 0


def cmd_models_activate(args: argparse.Namespace, settings: Settings) -> int:
    from appliance.wiring import connect

    with connect(settings, role="appliance models") as appliance:
        previous = _active(appliance.model_versions())
        appliance.activate_model(args.version, force=args.force, operator=_operator())
    print(f"activated {args.version} (was {previous}); a running service switches to it")
    return 0


def cmd_models_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from appliance.wiring import connect

    with connect(settings, role="appliance models") as appliance:
        previous = _active(appliance.model_versions())
        result = appliance.activate_model(rollback=True, operator=_operator())
    print(f"rolled back from {previous} to {result['active']}")
    return 0


def cmd_models_export_ollama(args: argparse.Namespace, settings: Settings) -> int:
    from appliance.core.prompting import system_prompt
    from finetune.ollama_export import create_in_ollama, default_tag, write_modelfile
    from finetune.registry import registry_for

    registry = registry_for(settings)
    registry.verified_gguf(args.version)  # never hand a changed file to another server
    record = registry.get(args.version)
    out = Path(args.out) if args.out else settings.models_dir / "ollama" / args.version
    system = system_prompt(settings.answer.system_prompt)
    modelfile = write_modelfile(record, out, system)
    result: dict[str, Any] = {"version": args.version, "modelfile": str(modelfile), "tag": None}
    url = args.url or settings.finetune.ollama_url
    if url:
        tag = args.tag or default_tag(args.version)
        result["tag"] = create_in_ollama(url, tag, record, system_prompt=system)
        registry.update(args.version, ollama_tag=tag)
        from appliance.core.audit import open_audit_log

        open_audit_log(settings).record(
            "admin", _operator(), action="model_export_ollama", target=args.version, tag=tag
        )
    if args.json:
        _print_json(result)
    else:
        print(f"wrote {modelfile}")
        if result["tag"]:
            print(f"created {result['tag']} on {url}")
        else:
            print(f"no Ollama URL given; on the Ollama host run: ollama create TAG -f {modelfile}")
    return 0


def add_commands(sub: Any) -> None:  # argparse._SubParsersAction
    p = sub.add_parser("models", help="model versions: list, activate, roll back, export")
    msub = p.add_subparsers(dest="models_command", required=True)

    q = msub.add_parser("list", help="every model version, the active one marked *")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_models_list, log_file=False)

    q = msub.add_parser("activate", help="serve a model version (its gate must have passed)")
    q.add_argument("version", metavar="VERSION")
    q.add_argument("--force", action="store_true", help="activate even though its gate failed")
    q.set_defaults(func=cmd_models_activate, log_file=False)

    q = msub.add_parser("rollback", help="back to the previously active version")
    q.set_defaults(func=cmd_models_rollback, log_file=False)

    q = msub.add_parser("export-ollama", help="write a Modelfile; create the model in Ollama")
    q.add_argument("version", metavar="VERSION")
    q.add_argument("--tag", help="the Ollama model name (default: appliance:VERSION)")
    q.add_argument("--url", help="the Ollama server (default: finetune.ollama_url)")
    q.add_argument("--out", help="folder of the Modelfile (default: DATA/models/ollama/VERSION)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_models_export_ollama, log_file=False)
