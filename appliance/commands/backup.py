"""The `appliance backup` and `appliance restore` commands (the archive format and its checks
live in ``appliance.backup``). A backup goes through the appliance ``wiring.connect`` picks;
a restore replaces the data folder itself, which is no ``Appliance`` operation: it is refused
while a core service runs (``wiring.stopped``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from appliance.backup import restore_backup
from appliance.core.settings import Settings


def backup_command(args: argparse.Namespace, settings: Settings) -> int:
    """Through the running core service when there is one (it owns the index and holds its
    writes for the copy), else under the data-folder lock in this process."""
    from appliance.wiring import connect

    dest = Path(args.file).resolve()
    with connect(settings, role="appliance backup") as appliance:
        manifest = appliance.backup(dest, include_models=args.include_models)
    if args.json:
        sys.stdout.write(json.dumps(manifest) + "\n")
        return 0
    index = manifest["index"]
    print(
        f"backup written to {manifest['path']}: {len(manifest['members'])} members, "
        f"{manifest['bytes'] / 1048576:.1f} MiB in {manifest['seconds']:.1f} s"
    )
    if not index["included"]:
        print(f"note: {index['note']}", file=sys.stderr)
    audit = manifest["audit"]
    if audit.get("included") and not audit.get("ok"):
        print(f"warning: the audit log does not verify: {audit['problem']}", file=sys.stderr)
    return 0


def restore_command(args: argparse.Namespace, settings: Settings) -> int:
    from appliance.wiring import stopped

    # Restoring replaces the data folder itself, which is no operation of an appliance: it is
    # refused while a core service owns the folder (``wiring.stopped``), never done behind it.
    with stopped(settings, role="appliance restore", doing="restoring"):
        result = restore_backup(settings, Path(args.file), force=args.force)
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
        return 0
    print(
        f"restored {result['members']} members from {result['from']} "
        f"(made {result['created']}) into {result['restored']}"
    )
    if result["moved_aside"]:
        print(f"the previous content is in {result['moved_aside']}")
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return 0


def add_commands(sub: Any) -> None:  # argparse._SubParsersAction
    p = sub.add_parser("backup", help="write the data folder to one tar file (with a manifest)")
    p.add_argument("file", help="the backup file (.tar, or .tar.gz / .tgz to compress)")
    p.add_argument(
        "--include-models", action="store_true", help="include the model files, not references"
    )
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=backup_command, log_file=True)

    p = sub.add_parser("restore", help="restore a backup into the data folder")
    p.add_argument("file", help="a file written by `appliance backup`")
    p.add_argument(
        "--force", action="store_true", help="move a non-empty data folder's content aside first"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=restore_command, log_file=False)
