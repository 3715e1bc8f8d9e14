"""Many staff at once: concurrent sign-ins and streamed answers against the real core service.

Starts ``appliance serve`` in a child process on free ports over a fresh data folder and a small
corpus (the SEC 10-Q filings of ``../shared/eval/sec10q``, copied into the documents folder, or
``--generated N`` small documents when the corpus is absent or asked for), with ``--users``
staff accounts created beforehand through the accounts API. When the startup scan is done,
``--users`` client threads each sign in through ``/auth/login`` and ask questions in a loop for
``--duration`` seconds through the local API with streaming (NDJSON), as the UI does.

Reported: requests completed, errors (with their messages), abstentions, time to first token
and total time per request (p50, p95, max), and the service's resident memory sampled every
``--sample-every`` seconds (at the start of the load, its peak, at the end, and the slope of a
least-squares line through the samples during the load). The chat model is one llama.cpp model
that answers one question at a time, so latency grows with the number of users: that is
expected, and it is what this measures.

    .venv/bin/python benchmarks/load_test.py [--users 20] [--duration 300] [--limit N]
        [--generated N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    SEC10Q,
    SEC10Q_DOCS,
    data_folder,
    latency_summary,
    load_note,
    machine,
    print_json,
    quiet_libraries,
    setup_logging,
)
from _reliability import ROOT, document_text, rss_mb, slope_per_min

PASSWORD = "load-test-password-{n:02d}"


@dataclass
class Results:
    """What the client threads record, under one lock."""

    ttft_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    abstained: int = 0
    logins: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def corpus(args: argparse.Namespace, docs: Path) -> tuple[str, list[str]]:
    """Fill ``docs``; return a description and the questions to ask."""
    docs.mkdir(parents=True, exist_ok=True)
    if args.generated == 0 and SEC10Q_DOCS.is_dir():
        pdfs = sorted(SEC10Q_DOCS.glob("*.pdf"))
        pdfs = [p for p in pdfs if args.match in p.name][: args.limit or None]
        if pdfs:
            for pdf in pdfs:
                shutil.copy(pdf, docs / pdf.name)  # the service watches its own folder
            questions = [
                json.loads(line)["question"]
                for line in (SEC10Q / "qa.jsonl").read_text(encoding="utf-8").splitlines()
                if line.strip()
            ]
            return f"{len(pdfs)} SEC 10-Q filings of {SEC10Q_DOCS}", questions
    count = args.generated or 30
    if args.generated == 0:
        print(
            f"load_test: the shared corpus is absent ({SEC10Q_DOCS}); using {count} generated "
            "documents",
            file=sys.stderr,
        )
    rng = random.Random(args.seed)
    for n in range(count):
        (docs / f"note-{n:03d}.md").write_text(document_text(n, rng), encoding="utf-8")
    questions = [
        f"How many working days does approval take under policy note {n}?" for n in range(count)
    ]
    questions += [f"Who owns policy note {n}?" for n in range(count)]
    return f"{count} generated policy notes", questions


def create_users(data: Path, users: int) -> None:
    from appliance.accounts import Accounts
    from appliance.core.settings import load_settings

    settings = load_settings(overrides={"data_dir": str(data)})
    data.mkdir(parents=True, exist_ok=True)
    with Accounts(settings.accounts_path) as accounts:
        for n in range(users):
            accounts.add_user(f"staff{n:02d}", PASSWORD.format(n=n), role="staff")


def start_service(data: Path, docs: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with log.open("wb") as err:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appliance.cli",
                "--data-dir",
                str(data),
                "serve",
                str(docs),
                "--port",
                "0",
                "--metrics-port",
                "0",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def stop_service(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, as systemd stops it; killed if it has not exited within a minute."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_ready(proc: subprocess.Popen[bytes], data: Path, files: int, timeout: float) -> Any:
    """The service's client once its API answers and the startup scan indexed every file."""
    from appliance.api import ServiceClient
    from appliance.core.errors import ServiceError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"appliance serve exited with {proc.returncode}")
        client = ServiceClient.find(data)
        if client is not None:
            try:
                status = client.call("GET", "/status", timeout=10)
            except ServiceError:
                status = None
            if status is not None and not status["answering"]:
                raise RuntimeError("the core service runs without a chat model: see its log")
            if (
                status is not None
                and status["watcher"]["state"] == "ok"
                and status["documents"] + len(status["failed"]) >= files
                and not status["in_progress"]
            ):
                return client, status
        time.sleep(1.0)
    raise RuntimeError(f"the core service was not ready within {timeout:g} s")


def user_loop(
    n: int, client: Any, questions: list[str], deadline: float, seed: int, results: Results
) -> None:
    rng = random.Random(seed * 1000 + n)
    try:
        login = client.call(
            "POST", "/auth/login", {"username": f"staff{n:02d}", "password": PASSWORD.format(n=n)}
        )
    except Exception as exc:
        with results.lock:
            results.errors.append(f"login staff{n:02d}: {exc}")
        return
    with results.lock:
        results.logins += 1
    me = client.with_session(login["session"])
    while time.monotonic() < deadline:
        question = rng.choice(questions)
        started = time.perf_counter()
        first: float | None = None
        final: dict[str, Any] | None = None
        try:
            for event in me.stream("/ask", {"question": question, "stream": True}):
                if event["type"] == "token" and first is None:
                    first = time.perf_counter()
                elif event["type"] == "answer":
                    final = event["answer"]
            if final is None:
                raise RuntimeError("the stream ended without an answer")
        except Exception as exc:
            with results.lock:
                results.errors.append(f"staff{n:02d}: {type(exc).__name__}: {exc}"[:300])
            continue
        done = time.perf_counter()
        with results.lock:
            results.total_s.append(done - started)
            results.ttft_s.append((first or done) - started)
            results.abstained += bool(final["abstained"])


def sample_memory(
    pid: int, stop: threading.Event, every: float, out: list[tuple[float, float]], t0: float
) -> None:
    while not stop.is_set():
        rss = rss_mb(pid)
        if rss is not None:
            out.append((time.monotonic() - t0, rss))
        stop.wait(every)


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    docs, data = root / "docs", root / "data"
    what, questions = corpus(args, docs)
    files = len([p for p in docs.iterdir() if p.is_file()])
    create_users(data, args.users)
    proc = start_service(data, docs, root / "serve.log")
    try:
        started = time.monotonic()
        client, status = wait_ready(proc, data, files, args.startup_timeout)
        startup_s = time.monotonic() - started
        at_start = machine()
        results = Results()
        samples: list[tuple[float, float]] = []
        stop = threading.Event()
        t0 = time.monotonic()
        sampler = threading.Thread(
            target=sample_memory,
            args=(proc.pid, stop, args.sample_every, samples, t0),
            daemon=True,
        )
        sampler.start()
        deadline = t0 + args.duration
        threads = [
            threading.Thread(
                target=user_loop,
                args=(n, client, questions, deadline, args.seed, results),
                name=f"user{n}",
            )
            for n in range(args.users)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        stop.set()
        sampler.join()
        final_rss = rss_mb(proc.pid)
        if final_rss is not None:
            samples.append((time.monotonic() - t0, final_rss))
        alive = proc.poll() is None
    finally:
        stop_service(proc)
    during = [(t, v) for t, v in samples if t <= args.duration]
    rss_values = [v for _t, v in samples]
    completed = len(results.total_s)
    return {
        "corpus": what,
        "documents": status["documents"],
        "chunks": status["chunks"],
        "users": args.users,
        "logins": results.logins,
        "duration_s": args.duration,
        "wall_s": round(wall, 1),
        "startup_s": round(startup_s, 1),
        "requests_completed": completed,
        "requests_per_min": round(60 * completed / wall, 2) if wall else None,
        "errors": len(results.errors),
        "error_examples": results.errors[:5],
        "abstained": results.abstained,
        "ttft": latency_summary(results.ttft_s) if completed else None,
        "total": latency_summary(results.total_s) if completed else None,
        "rss_mb": {
            "start": round(rss_values[0], 1) if rss_values else None,
            "peak": round(max(rss_values), 1) if rss_values else None,
            "end": round(rss_values[-1], 1) if rss_values else None,
            "slope_mb_per_min": slope_per_min(during),
            # the first minutes include warm-up (allocator arenas, the KV cache, conversations
            # and audit growing): the second half's slope is the one that would show a leak
            "slope_second_half_mb_per_min": slope_per_min(
                [(t, v) for t, v in during if t >= args.duration / 2]
            ),
            "samples": [(round(t, 1), round(v, 1)) for t, v in samples],
        },
        "service_alive_after": alive,
        "machine": at_start,
    }


def print_report(r: dict[str, Any]) -> None:
    print(
        f"Load test: {r['users']} staff users, {r['duration_s']} s, over {r['corpus']} "
        f"({r['documents']} documents, {r['chunks']} chunks; service ready in {r['startup_s']} s)"
    )
    print(
        f"  sign-ins {r['logins']} of {r['users']}; requests completed {r['requests_completed']} "
        f"in {r['wall_s']} s ({r['requests_per_min']} per minute, the last ones finishing after "
        f"the deadline); abstained {r['abstained']}"
    )
    print(f"  errors {r['errors']}")
    for example in r["error_examples"]:
        print(f"    {example}")
    for name, label in (("ttft", "time to first token"), ("total", "total per request")):
        s = r[name]
        if s:
            print(
                f"  {label:20s} p50 {s['p50_ms'] / 1000:6.2f} s  p95 {s['p95_ms'] / 1000:6.2f} s"
                f"  max {s['max_ms'] / 1000:6.2f} s  (n={s['n']})"
            )
    m = r["rss_mb"]
    print(
        f"  service RSS: start {m['start']} MiB, peak {m['peak']} MiB, end {m['end']} MiB, "
        f"slope {m['slope_mb_per_min']} MiB/min over {len(m['samples'])} samples "
        f"({m['slope_second_half_mb_per_min']} MiB/min over the second half)"
    )
    print(f"  service still running at the end: {'yes' if r['service_alive_after'] else 'NO'}")
    print(f"  {load_note(r['machine'])}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--users", type=int, default=20, help="concurrent staff users (20)")
    parser.add_argument("--duration", type=float, default=300, help="seconds of load (300)")
    parser.add_argument("--match", default="", help="only filings whose name contains this")
    parser.add_argument("--limit", type=int, default=0, help="only the first N filings (0: all)")
    parser.add_argument(
        "--generated", type=int, default=0, help="use N generated documents instead of sec10q"
    )
    parser.add_argument("--sample-every", type=float, default=5.0, help="RSS sampling, s (5)")
    parser.add_argument("--startup-timeout", type=float, default=1200, help="s (1200)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--data-dir", type=Path, help="keep the folders here (default: temp)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    quiet_libraries()
    if args.users < 1 or args.duration <= 0 or args.limit < 0 or args.generated < 0:
        print("--users >= 1, --duration > 0, --limit >= 0, --generated >= 0", file=sys.stderr)
        return 2
    try:
        with data_folder(args.data_dir, "load-test-") as root:
            result = run(args, root)
    except RuntimeError as exc:  # a child process that did not start or failed, with its words
        print(f"load_test: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print_json(result)
    else:
        print_report(result)
    return 0 if result["errors"] == 0 and result["service_alive_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
