"""kill -9 during real ingestion, many times: afterwards the index equals the folder exactly.

Generates ``--files`` small distinct documents (Markdown and text, a few PDFs when reportlab is
installed) in a temporary folder, then ``--rounds`` times starts a real ingestion in a child
process (the default settings: the parser sandbox, the packaged MiniLM embedding model, BM25,
Qdrant Edge with its WAL, the SQLite state) and SIGKILLs it at a random moment after its
start-up, changing a few files between rounds (``--churn``). A last, uninterrupted run is the
real CLI, ``appliance --data-dir DATA ingest DOCS --json --confirm-deletions``; then the index is
compared with the folder by the check the ingestion tests use (``tests/ingest/exactness.py``):
missing, duplicate and stale chunks must all be 0, and one more ingest must find nothing to do.

    .venv/bin/python benchmarks/reliability_kill9.py [--files 1000] [--rounds 20] [--seed 7]
        [--max-delay 4] [--churn 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import data_folder, load_note, machine, print_json, quiet_libraries, setup_logging
from _reliability import ROOT, document_text, exactness

READY = "reconciling"
"""The worker prints this once start-up and recovery are done: kills are timed from it, so they
land in the ingestion itself rather than in the imports."""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "TQDM_DISABLE": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


def write_pdf(path: Path, text: str) -> None:
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    pdf = canvas.Canvas(str(path), pagesize=A4)
    y = 800
    for line in text.splitlines():
        for start in range(0, len(line), 90):
            pdf.drawString(40, y, line[start : start + 90])
            y -= 14
    pdf.save()


def make_corpus(docs: Path, files: int, rng: random.Random, pdf_every: int) -> int:
    """``files`` distinct documents in 8 subfolders; returns how many are PDFs."""
    try:
        import reportlab  # noqa: F401
    except ImportError:
        pdf_every = 0  # optional: the dev extra brings it
    pdfs = 0
    for n in range(files):
        sub = docs / f"team{n % 8}"
        sub.mkdir(parents=True, exist_ok=True)
        text = document_text(n, rng)
        if pdf_every and n % pdf_every == pdf_every - 1:
            write_pdf(sub / f"note-{n:05d}.pdf", text)
            pdfs += 1
        else:
            (sub / f"note-{n:05d}.{'md' if n % 3 else 'txt'}").write_text(text, encoding="utf-8")
    return pdfs


def churn(docs: Path, rng: random.Random, step: int, ops: int, next_id: list[int]) -> None:
    """A few ordinary changes between runs, so recovery meets modified, renamed and deleted
    documents as well as half-written ones."""
    files = sorted(p for p in docs.rglob("*") if p.is_file() and p.suffix in (".md", ".txt"))
    for path in rng.sample(files, min(ops, len(files))):
        action = rng.choice(["modify", "modify", "rename", "delete", "create"])
        if action == "modify":
            path.write_text(path.read_text() + f"\nAmended in round {step}.\n", encoding="utf-8")
        elif action == "rename":
            path.rename(path.with_name(f"r{step}-{path.name}"))
        elif action == "delete":
            path.unlink()
        else:
            n = next_id[0]
            next_id[0] += 1
            (path.parent / f"note-{n:05d}.md").write_text(
                document_text(n, rng, revision=step), encoding="utf-8"
            )


def run_killed(data: Path, docs: Path, delay: float) -> tuple[int, float]:
    """One worker run, SIGKILLed ``delay`` seconds after it is ready; (exit code, seconds)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--worker", str(data), str(docs)],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        if line.strip() != READY:
            proc.kill()
            raise RuntimeError(f"the ingestion worker did not start (it said {line!r})")
        try:
            code = proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            code = proc.wait()
    finally:
        proc.stdout.close()
    return code, time.monotonic() - started


def run_cli(data: Path, docs: Path) -> dict[str, Any]:
    """The real ``appliance ingest`` to the end; its JSON summary."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance.cli",
            "--data-dir",
            str(data),
            "ingest",
            str(docs),
            "--json",
            "--confirm-deletions",
        ],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"appliance ingest exited {proc.returncode}: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def check(data: Path, docs: Path) -> dict[str, Any]:
    """Open the data folder as its owner (recovery runs), compare, then ingest once more."""
    from appliance.core.settings import load_settings
    from appliance.wiring import open_ingestion

    settings = load_settings(overrides={"data_dir": str(data)})
    with open_ingestion(settings, docs, role="reliability check") as ingestion:
        result = exactness(ingestion.indexer)
        again = ingestion.indexer.reconcile()
        result["second_ingest"] = {
            k: getattr(again, k) for k in ("added", "updated", "removed", "failed")
        }
    return result


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    docs, data = root / "docs", root / "data"
    at_start = machine()
    started = time.monotonic()
    pdfs = make_corpus(docs, args.files, rng, args.pdf_every)
    next_id = [args.files]
    rounds: list[dict[str, Any]] = []
    for step in range(args.rounds):
        delay = rng.uniform(args.min_delay, args.max_delay)
        code, seconds = run_killed(data, docs, delay)
        rounds.append(
            {
                "delay_s": round(delay, 2),
                "killed": code == -signal.SIGKILL,
                "exit": code,
                "seconds": round(seconds, 2),
            }
        )
        if args.churn:
            churn(docs, rng, step, args.churn, next_id)
    final_started = time.monotonic()
    final = run_cli(data, docs)
    final_s = time.monotonic() - final_started
    result = check(data, docs)
    killed = sum(r["killed"] for r in rounds)
    return {
        "files_generated": args.files,
        "pdfs": pdfs,
        "rounds": args.rounds,
        "killed": killed,
        "finished_before_kill": args.rounds - killed,
        "final_ingest": {k: final[k] for k in ("added", "updated", "removed", "failed", "chunks")}
        | {"seconds": round(final_s, 1)},
        **result,
        "exact": result["missing"] == result["duplicate"] == result["stale"] == 0
        and result["failed_files"] == 0
        and result["second_ingest"]["added"] == result["second_ingest"]["updated"] == 0
        and result["second_ingest"]["removed"] == 0,
        "seed": args.seed,
        "total_seconds": round(time.monotonic() - started, 1),
        "per_round": rounds,
        "machine": at_start,
    }


def print_report(r: dict[str, Any]) -> None:
    print(
        f"kill -9 during ingestion: {r['files_generated']} generated files ({r['pdfs']} PDFs), "
        f"{r['rounds']} rounds, seed {r['seed']}"
    )
    print(
        f"  rounds killed mid-run: {r['killed']} of {r['rounds']} "
        f"({r['finished_before_kill']} finished before their kill)"
    )
    f = r["final_ingest"]
    print(
        f"  final `appliance ingest`: added {f['added']}, updated {f['updated']}, removed "
        f"{f['removed']}, failed {f['failed']}, {f['chunks']} chunks written, {f['seconds']} s"
    )
    print(
        f"  folder: {r['folder_files']} files; index: {r['documents']} documents, "
        f"{r['chunks']} live chunks, {r['store_points']} points in the store"
    )
    print(
        f"  missing {r['missing']}, duplicate {r['duplicate']}, stale {r['stale']}; "
        f"files in the failed state {r['failed_files']}"
    )
    s = r["second_ingest"]
    print(f"  one more ingest: added {s['added']}, updated {s['updated']}, removed {s['removed']}")
    for problem in r["problems"]:
        print(f"    problem: {problem}")
    print(f"  => {'EXACT' if r['exact'] else 'NOT EXACT'}; total {r['total_seconds']} s")
    print(f"  {load_note(r['machine'])}")


def worker(data: Path, docs: Path) -> int:
    """One ingestion as ``appliance ingest`` does it, announcing when it starts writing."""
    from appliance.core.settings import load_settings
    from appliance.wiring import open_ingestion, prepare_process

    settings = load_settings(overrides={"data_dir": str(data)})
    prepare_process(settings)
    with open_ingestion(settings, docs, role="reliability kill9 worker") as ingestion:
        print(READY, flush=True)
        report = ingestion.indexer.reconcile(confirm_deletions=True)
        print(json.dumps(report.as_json()), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000, help="documents generated (1000)")
    parser.add_argument("--rounds", type=int, default=20, help="killed runs (20)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the corpus and the kills")
    parser.add_argument("--min-delay", type=float, default=0.2, help="earliest kill, s (0.2)")
    parser.add_argument("--max-delay", type=float, default=4.0, help="latest kill, s (4)")
    parser.add_argument("--churn", type=int, default=10, help="files changed between runs (10)")
    parser.add_argument(
        "--pdf-every", type=int, default=20, help="every Nth file is a PDF (0: none; 20)"
    )
    parser.add_argument("--data-dir", type=Path, help="keep the folders here (default: temp)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("DATA", "DOCS"), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    if args.worker:
        return worker(Path(args.worker[0]), Path(args.worker[1]))
    setup_logging(args.verbose)
    if args.files < 1 or args.rounds < 0 or not 0 <= args.min_delay <= args.max_delay:
        print("--files >= 1, --rounds >= 0 and 0 <= --min-delay <= --max-delay", file=sys.stderr)
        return 2
    try:
        with data_folder(args.data_dir, "reliability-kill9-") as root:
            result = run(args, root)
    except RuntimeError as exc:  # a child process that did not start or failed, with its words
        print(f"reliability_kill9: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print_json(result)
    else:
        print_report(result)
    return 0 if result["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
