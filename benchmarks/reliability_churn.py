"""Thousands of random file operations under the running watcher: the index converges exactly.

Starts the core service's ingestion in this process as ``appliance serve`` composes it
(``open_ingestion`` with the default settings: the parser sandbox, the packaged MiniLM model,
BM25, Qdrant Edge) and the real ``FolderWatcher`` on a folder of ``--initial`` small documents
in 6 subfolders, then performs ``--ops`` random operations in bursts with random pauses:
create, modify (rewrite or append), rename in place, move to another subfolder, delete, and
now and then rename a whole subfolder. After the last operation it waits until the watcher is
idle and the index equals the folder (``tests/ingest/exactness.py``), and reports the time to
converge and the missing, duplicate and stale counts (all must be 0).

    .venv/bin/python benchmarks/reliability_churn.py [--ops 2000] [--initial 200] [--seed 7]
        [--max-burst 20] [--min-pause 0] [--max-pause 1.5] [--json]

The mass-deletion guard stays at its defaults; when it holds a batch (more than half of the
indexed documents gone at once, renames and moves included) the benchmark records it and
confirms, as an admin would, and reports how often that happened.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _common import data_folder, load_note, machine, print_json, quiet_libraries, setup_logging
from _reliability import document_text, exactness

SUBFOLDERS = 6
OPS = ("create", "modify", "append", "rename", "move", "delete", "rename_folder")
WEIGHTS = (20, 15, 10, 15, 20, 19, 1)


class Churner:
    """Random operations on a folder of documents, with the population kept near its start."""

    def __init__(self, docs: Path, rng: random.Random, target: int) -> None:
        self.docs = docs
        self.rng = rng
        self.target = target
        self.next_id = 0
        self.done: Counter[str] = Counter()

    def files(self) -> list[Path]:
        return sorted(p for p in self.docs.rglob("*") if p.is_file())

    def folders(self) -> list[Path]:
        return sorted(p for p in self.docs.iterdir() if p.is_dir())

    def create(self, folder: Path | None = None) -> None:
        folder = folder or self.rng.choice(self.folders())
        n = self.next_id
        self.next_id += 1
        suffix = "md" if n % 3 else "txt"
        (folder / f"doc-{n:05d}.{suffix}").write_text(document_text(n, self.rng), encoding="utf-8")

    def one(self) -> str:
        files = self.files()
        op = self.rng.choices(OPS, WEIGHTS)[0]
        if len(files) < 0.8 * self.target:
            # Keep the folder populated: a batch that removes more than half of the indexed
            # documents is held by the mass-deletion guard until an admin confirms it, which is
            # the guard working, not the convergence this measures.
            op = "create"
        if op != "create" and not files:
            op = "create"
        path = self.rng.choice(files) if files else None
        if op == "create" or path is None:
            self.create()
        elif op == "modify":
            n = self.next_id
            self.next_id += 1
            path.write_text(document_text(n, self.rng, revision=1), encoding="utf-8")
        elif op == "append":
            with path.open("a", encoding="utf-8") as out:
                out.write(f"\nAddendum {self.rng.randint(0, 10**6)}: {self.rng.random():.6f}.\n")
        elif op == "rename":
            path.rename(path.with_name(f"r{self.rng.randint(0, 10**6)}-{path.name}"))
        elif op == "move":
            others = [f for f in self.folders() if f != path.parent]
            target = self.rng.choice(others) / path.name
            if target.exists():
                target = target.with_name(f"m{self.rng.randint(0, 10**6)}-{path.name}")
            path.rename(target)
        elif op == "delete":
            path.unlink()
        else:  # rename_folder
            folder = self.rng.choice(self.folders())
            folder.rename(folder.with_name(f"{folder.name.split('-')[0]}-{self.next_id}"))
            self.next_id += 1
        self.done[op] += 1
        return op


def confirm_held(watcher: Any, holds: list[str]) -> None:
    """When the mass-deletion guard holds a batch, record it and confirm as an admin would
    (``appliance ingest --confirm-deletions``): the churn's deletions are real. The guard counts
    renamed and moved paths as deletions, so a burst that renames or moves more than half of
    the indexed documents is held too."""
    reason = watcher.health()["reason"] or ""
    if "holding deletion" in reason:
        holds.append(reason.split(":")[0])
        watcher.reconcile_now(confirm_deletions=True)


def wait_converged(
    watcher: Any, indexer: Any, timeout: float, holds: list[str]
) -> tuple[bool, float]:
    """Until the index equals the folder and the watcher has nothing left; (ok, seconds)."""
    from tests.ingest.exactness import index_problems

    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        confirm_held(watcher, holds)
        if not index_problems(indexer) and watcher.wait_idle(1.0) and not index_problems(indexer):
            return True, time.monotonic() - started
        time.sleep(0.2)
    return False, time.monotonic() - started


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from appliance.core.settings import load_settings
    from appliance.wiring import open_ingestion, prepare_process
    from ingest.watcher import FolderWatcher

    rng = random.Random(args.seed)
    docs, data = root / "docs", root / "data"
    for k in range(SUBFOLDERS):
        (docs / f"team{k}").mkdir(parents=True)
    settings = load_settings(
        overrides={
            "data_dir": str(data),
            "ingest": {
                "docs_dir": str(docs),
                "debounce_s": args.debounce,
                # convergence must come from events, not from a timed rescan
                "reconcile_interval_s": 0,
            },
        }
    )
    prepare_process(settings)
    churner = Churner(docs, rng, args.initial)
    for _ in range(args.initial):
        churner.create()
    at_start = machine()
    reports: list[Any] = []
    with open_ingestion(settings, docs, role="reliability churn") as ingestion:
        watcher = FolderWatcher(ingestion.indexer, settings.ingest, on_report=reports.append)
        start_scan = time.monotonic()
        with watcher:
            startup_s = time.monotonic() - start_scan
            started = time.monotonic()
            done = 0
            degraded: set[str] = set()
            holds: list[str] = []
            while done < args.ops:
                for _ in range(min(rng.randint(1, args.max_burst), args.ops - done)):
                    churner.one()
                    done += 1
                health = watcher.health()
                if health["state"] != "ok":
                    degraded.add(str(health["reason"]))
                confirm_held(watcher, holds)
                time.sleep(rng.uniform(args.min_pause, args.max_pause))
            ops_s = time.monotonic() - started
            ok, converge_s = wait_converged(watcher, ingestion.indexer, args.timeout, holds)
            result = exactness(ingestion.indexer)
            health = watcher.health()
        reconciles = len(reports)
        failed = sum(r.failed for r in reports)
    return {
        "ops": args.ops,
        "by_kind": dict(churner.done),
        "initial_files": args.initial,
        "startup_scan_s": round(startup_s, 1),
        "ops_seconds": round(ops_s, 1),
        "converged": ok,
        "converge_s": round(converge_s, 1),
        "reconciles": reconciles,
        "failed_reports": failed,
        "watcher_state": health["state"],
        "watcher_reason": health["reason"],
        "watcher_degraded_during": sorted(degraded),
        "guard_holds_confirmed": holds,
        **result,
        "exact": ok
        and result["missing"] == result["duplicate"] == result["stale"] == 0
        and result["failed_files"] == 0,
        "seed": args.seed,
        "debounce_s": args.debounce,
        "machine": at_start,
    }


def print_report(r: dict[str, Any]) -> None:
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["by_kind"].items()))
    print(
        f"churn under the watcher: {r['ops']} operations on {r['initial_files']} starting files "
        f"(seed {r['seed']}, debounce {r['debounce_s']} s)"
    )
    print(f"  operations: {kinds}")
    print(
        f"  startup scan {r['startup_scan_s']} s; operations took {r['ops_seconds']} s; "
        f"{r['reconciles']} reconciles ran, reporting {r['failed_reports']} per-file failures "
        "on the way (mostly files gone between the scan and the read, retried by later events)"
    )
    print(
        f"  converged after the last operation: {'yes' if r['converged'] else 'NO'} in "
        f"{r['converge_s']} s; watcher {r['watcher_state']}"
        + (f" ({r['watcher_reason']})" if r["watcher_reason"] else "")
    )
    for reason in r["watcher_degraded_during"]:
        print(f"    degraded during the churn: {reason}")
    for hold in r["guard_holds_confirmed"]:
        print(f"    mass-deletion guard held a batch ({hold}); confirmed as an admin would")
    print(
        f"  folder: {r['folder_files']} files; index: {r['documents']} documents, "
        f"{r['chunks']} live chunks, {r['store_points']} points in the store"
    )
    print(
        f"  missing {r['missing']}, duplicate {r['duplicate']}, stale {r['stale']}; "
        f"files in the failed state {r['failed_files']}"
    )
    for problem in r["problems"]:
        print(f"    problem: {problem}")
    print(f"  => {'EXACT' if r['exact'] else 'NOT EXACT'}")
    print(f"  {load_note(r['machine'])}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=2000, help="random operations (2000)")
    parser.add_argument("--initial", type=int, default=200, help="files at the start (200)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-burst", type=int, default=20, help="operations per burst (20)")
    parser.add_argument("--min-pause", type=float, default=0.0, help="pause between bursts, s")
    parser.add_argument("--max-pause", type=float, default=1.5, help="pause between bursts, s")
    parser.add_argument("--debounce", type=float, default=1.0, help="ingest.debounce_s (1.0)")
    parser.add_argument("--timeout", type=float, default=600, help="convergence limit, s")
    parser.add_argument("--data-dir", type=Path, help="keep the folders here (default: temp)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    quiet_libraries()
    if (
        args.ops < 1
        or args.initial < 2
        or args.max_burst < 1
        or not 0 <= args.min_pause <= (args.max_pause)
    ):
        print(
            "--ops >= 1, --initial >= 2, --max-burst >= 1, 0 <= --min-pause <= --max-pause",
            file=sys.stderr,
        )
        return 2
    with data_folder(args.data_dir, "reliability-churn-") as root:
        result = run(args, root)
    if args.json:
        print_json(result)
    else:
        print_report(result)
    return 0 if result["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
