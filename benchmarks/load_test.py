"""Many staff at once: concurrent sign-ins and streamed answers against the real core service,
for each chat engine side by side.

Starts ``appliance serve`` in a child process on free ports over a data folder and a small
corpus (the SEC 10-Q filings of ``../shared/eval/sec10q``, copied into the documents folder, or
``--generated N`` small documents when the corpus is absent or asked for), with ``--users``
staff accounts created beforehand through the accounts API. The service runs once per engine
of ``--engines`` (``chat.parallel`` values: 1 is today's serial engine; more is the batched
engine where the build has one), one after the other over the same data folder. Each run:

1. ``--asks`` real ``appliance ask`` commands against the running service, one after another,
   then all at once: the ratio of the two wall times (1.0: served one at a time);
2. ``--users`` client threads sign in at the same moment through ``/auth/login``, then ask
   questions in a loop for ``--duration`` seconds through the local API with streaming
   (NDJSON), as the UI does.

Reported per engine: sign-ins, requests completed, errors (with their messages), connection
resets, 503 answers (a full queue: the client waits the Retry-After and asks again), time to
first evidence (the sources event), time to first token and total time per request (p50,
p95, max), and the service's resident memory sampled every ``--sample-every`` seconds (at the
start of the load, its peak, at the end, and the slope of a least-squares line through the
samples during the load); then the engines' ratios against the first one.

    .venv/bin/python benchmarks/load_test.py [--users 20] [--duration 300] [--limit N]
        [--generated N] [--engines 1,8] [--asks 8] [--queue-limit N] [--json]
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
    evidence_s: list[float] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    abstained: int = 0
    logins: int = 0
    resets: int = 0
    busy: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def mean_or_none(values: list[int]) -> float | None:
    return round(sum(values) / len(values), 1) if values else None


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


def engine_env(parallel: int, queue_limit: int | None) -> dict[str, str]:
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["APPLIANCE_CHAT__PARALLEL"] = str(parallel)
    if queue_limit is not None:
        env["APPLIANCE_SERVICE__QUEUE_LIMIT"] = str(queue_limit)
    return env


def start_service(
    data: Path, docs: Path, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    env = env or engine_env(1, None)
    with log.open("ab") as err:
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


def is_reset(exc: BaseException) -> bool:
    """A connection the service reset or dropped (what a burst must never cause)."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(w in text for w in ("reset", "broken pipe", "remotedisconnected", "refused"))


def user_loop(
    n: int,
    client: Any,
    questions: list[str],
    deadline: float,
    seed: int,
    results: Results,
    ready: threading.Barrier,
) -> None:
    from appliance.core.errors import ServiceError

    rng = random.Random(seed * 1000 + n)
    try:
        ready.wait(timeout=120)  # every user signs in at the same moment
        login = client.call(
            "POST", "/auth/login", {"username": f"staff{n:02d}", "password": PASSWORD.format(n=n)}
        )
    except Exception as exc:
        with results.lock:
            results.errors.append(f"login staff{n:02d}: {exc}")
            results.resets += is_reset(exc)
        return
    with results.lock:
        results.logins += 1
    me = client.with_session(login["session"])
    while time.monotonic() < deadline:
        question = rng.choice(questions)
        started = time.perf_counter()
        first: float | None = None
        evidence: float | None = None
        final: dict[str, Any] | None = None
        try:
            for event in me.stream("/ask", {"question": question, "stream": True}):
                if event["type"] == "sources" and evidence is None:
                    evidence = time.perf_counter()
                elif event["type"] == "token" and first is None:
                    first = time.perf_counter()
                elif event["type"] == "answer":
                    final = event["answer"]
            if final is None:
                raise RuntimeError("the stream ended without an answer")
        except ServiceError as exc:
            if exc.status == 503:  # the queue is full: not an error, wait as told
                with results.lock:
                    results.busy += 1
                time.sleep(min(exc.retry_after_s or 1.0, max(deadline - time.monotonic(), 0)))
                continue
            with results.lock:
                results.errors.append(f"staff{n:02d}: {type(exc).__name__}: {exc}"[:300])
                results.resets += is_reset(exc.__cause__ or exc)
            continue
        except Exception as exc:
            with results.lock:
                results.errors.append(f"staff{n:02d}: {type(exc).__name__}: {exc}"[:300])
                results.resets += is_reset(exc)
            continue
        done = time.perf_counter()
        with results.lock:
            results.total_s.append(done - started)
            results.ttft_s.append((first or done) - started)
            results.evidence_s.append((evidence or done) - started)
            timings = final.get("timings") or {}
            if timings.get("completion_tokens") is not None:
                results.completion_tokens.append(int(timings["completion_tokens"]))
                results.prompt_tokens.append(int(timings.get("prompt_tokens") or 0))
            results.abstained += bool(final["abstained"])


def cli_asks(data: Path, questions: list[str], env: dict[str, str]) -> dict[str, Any]:
    """``appliance ask`` commands (the real CLI, each its own process) against the running
    service: one after another, then all at once; wall times and their ratio."""

    def command(question: str) -> list[str]:
        return [sys.executable, "-m", "appliance.cli", "--data-dir", str(data), "ask", question]

    failures: list[str] = []

    def check(proc: subprocess.CompletedProcess[bytes] | subprocess.Popen[bytes]) -> None:
        if proc.returncode != 0:
            failures.append(f"appliance ask exited with {proc.returncode}")

    t0 = time.monotonic()
    for question in questions:
        check(subprocess.run(command(question), cwd=ROOT, env=env, capture_output=True))
    sequential = time.monotonic() - t0
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            command(q), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for q in questions
    ]
    for proc in procs:
        proc.wait()
        check(proc)
    simultaneous = time.monotonic() - t0
    return {
        "count": len(questions),
        "sequential_s": round(sequential, 2),
        "simultaneous_s": round(simultaneous, 2),
        "ratio": round(simultaneous / sequential, 3) if sequential else None,
        "failures": failures,
    }


def sample_memory(
    pid: int, stop: threading.Event, every: float, out: list[tuple[float, float]], t0: float
) -> None:
    while not stop.is_set():
        rss = rss_mb(pid)
        if rss is not None:
            out.append((time.monotonic() - t0, rss))
        stop.wait(every)


def run_engine(
    args: argparse.Namespace,
    root: Path,
    parallel: int,
    questions: list[str],
    files: int,
) -> dict[str, Any]:
    """One engine: start the service with ``chat.parallel`` = ``parallel``, the ``appliance
    ask`` phase, then the users' load; its figures."""
    docs, data = root / "docs", root / "data"
    env = engine_env(parallel, args.queue_limit)
    proc = start_service(data, docs, root / "serve.log", env)
    stop = threading.Event()
    asks: dict[str, Any] | None = None
    try:
        started = time.monotonic()
        client, status = wait_ready(proc, data, files, args.startup_timeout)
        startup_s = time.monotonic() - started
        at_start = machine()
        if args.asks:
            rng = random.Random(args.seed)
            asks = cli_asks(data, [rng.choice(questions) for _ in range(args.asks)], env)
        results = Results()
        samples: list[tuple[float, float]] = []
        t0 = time.monotonic()
        sampler = threading.Thread(
            target=sample_memory,
            args=(proc.pid, stop, args.sample_every, samples, t0),
            daemon=True,
        )
        sampler.start()
        deadline = t0 + args.duration
        ready = threading.Barrier(args.users)
        threads = [
            threading.Thread(
                target=user_loop,
                args=(n, client, questions, deadline, args.seed, results, ready),
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
        stop.set()
        stop_service(proc)
    during = [(t, v) for t, v in samples if t <= args.duration]
    rss_values = [v for _t, v in samples]
    completed = len(results.total_s)
    return {
        "parallel": parallel,
        "corpus": None,
        "documents": status["documents"],
        "chunks": status["chunks"],
        "users": args.users,
        "logins": results.logins,
        "duration_s": args.duration,
        "wall_s": round(wall, 1),
        "startup_s": round(startup_s, 1),
        "asks": asks,
        "requests_completed": completed,
        "requests_per_min": round(60 * completed / wall, 2) if wall else None,
        "errors": len(results.errors),
        "error_examples": results.errors[:5],
        "resets": results.resets,
        "busy_503": results.busy,
        "abstained": results.abstained,
        "ttft": latency_summary(results.ttft_s) if completed else None,
        "first_evidence": latency_summary(results.evidence_s) if completed else None,
        "total": latency_summary(results.total_s) if completed else None,
        # what the model wrote and read per answer: the decode work behind the times above
        "answer_tokens_mean": mean_or_none(results.completion_tokens),
        "prompt_tokens_mean": mean_or_none(results.prompt_tokens),
        "answer_tokens_per_min": (
            round(60 * sum(results.completion_tokens) / wall, 1) if wall else None
        ),
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


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Every engine of ``--engines`` in turn over one data folder; the first engine's figures
    at the top level (the fields of earlier runs), all of them under ``engines``, and the
    others' ratios against the first under ``comparison``."""
    docs, data = root / "docs", root / "data"
    what, questions = corpus(args, docs)
    files = len([p for p in docs.iterdir() if p.is_file()])
    create_users(data, args.users)
    engines = [run_engine(args, root, parallel, questions, files) for parallel in args.engines]
    for engine in engines:
        engine["corpus"] = what
    base = engines[0]
    comparison = [compare(base, other) for other in engines[1:]]
    return {**base, "engines": engines, "comparison": comparison}


def _p95(summary: dict[str, Any] | None) -> float | None:
    return summary["p95_ms"] / 1000 if summary else None


def compare(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """``other``'s figures over ``base``'s (below 1: ``other`` is faster)."""

    def over(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    return {
        "parallel": other["parallel"],
        "against_parallel": base["parallel"],
        "ttft_p95_ratio": over(_p95(other["ttft"]), _p95(base["ttft"])),
        "requests_per_min_ratio": over(other["requests_per_min"], base["requests_per_min"]),
        "asks_simultaneous_ratio": over(
            (other["asks"] or {}).get("simultaneous_s"), (base["asks"] or {}).get("simultaneous_s")
        ),
    }


def _cell(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def print_report(r: dict[str, Any]) -> None:
    engines = r["engines"]
    print(
        f"Load test: {r['users']} staff users, {r['duration_s']} s per engine, over "
        f"{r['corpus']} ({r['documents']} documents, {r['chunks']} chunks)"
    )

    def seconds(summary: dict[str, Any] | None, key: str) -> str:
        return "-" if not summary else f"{summary[key] / 1000:.2f} s"

    rows: list[tuple[str, list[str]]] = [
        ("service ready in", [f"{e['startup_s']} s" for e in engines]),
    ]
    if any(e["asks"] for e in engines):
        count = max((e["asks"] or {}).get("count", 0) for e in engines)
        rows += [
            (
                f"{count} `appliance ask` one by one",
                [_cell((e["asks"] or {}).get("sequential_s"), " s") for e in engines],
            ),
            (
                f"{count} `appliance ask` at once",
                [_cell((e["asks"] or {}).get("simultaneous_s"), " s") for e in engines],
            ),
            ("  at once / one by one", [_cell((e["asks"] or {}).get("ratio")) for e in engines]),
        ]
    rows += [
        ("sign-ins", [f"{e['logins']} of {e['users']}" for e in engines]),
        ("requests completed", [str(e["requests_completed"]) for e in engines]),
        ("requests per minute", [_cell(e["requests_per_min"]) for e in engines]),
        ("errors", [str(e["errors"]) for e in engines]),
        ("connection resets", [str(e["resets"]) for e in engines]),
        ("503 (queue full)", [str(e["busy_503"]) for e in engines]),
        ("abstained", [str(e["abstained"]) for e in engines]),
        ("answer tokens, mean", [_cell(e.get("answer_tokens_mean")) for e in engines]),
        ("prompt tokens, mean", [_cell(e.get("prompt_tokens_mean")) for e in engines]),
        ("answer tokens per minute", [_cell(e.get("answer_tokens_per_min")) for e in engines]),
    ]
    for name, label in (
        ("first_evidence", "first evidence"),
        ("ttft", "first token"),
        ("total", "total per request"),
    ):
        rows += [
            (f"{label} p50", [seconds(e[name], "p50_ms") for e in engines]),
            (f"{label} p95", [seconds(e[name], "p95_ms") for e in engines]),
        ]
    rows += [
        (f"RSS {k}", [_cell(e["rss_mb"][k], " MiB") for e in engines])
        for k in ("start", "peak", "end")
    ]
    rows.append(
        (
            "RSS slope (2nd half)",
            [_cell(e["rss_mb"]["slope_second_half_mb_per_min"], " MiB/min") for e in engines],
        )
    )
    rows.append(
        ("service alive after", ["yes" if e["service_alive_after"] else "NO" for e in engines])
    )
    head = [f"chat.parallel {e['parallel']}" for e in engines]
    width = max(len(label) for label, _ in rows) + 2
    print("  " + " " * width + "".join(f"{h:>18s}" for h in head))
    for label, cells in rows:
        print("  " + f"{label:{width}s}" + "".join(f"{c:>18s}" for c in cells))
    for c in r["comparison"]:
        print(
            f"  parallel {c['parallel']} / parallel {c['against_parallel']}: p95 first token "
            f"{_cell(c['ttft_p95_ratio'])}, requests per minute "
            f"{_cell(c['requests_per_min_ratio'])}, asks at once "
            f"{_cell(c['asks_simultaneous_ratio'])}"
        )
    for e in engines:
        for example in e["error_examples"]:
            print(f"  parallel {e['parallel']} error: {example}")
    print(f"  {load_note(r['machine'])}")


def engines(text: str) -> list[int]:
    """``--engines``: comma-separated chat.parallel values, e.g. ``1,8``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use chat.parallel values like 1,8") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: each chat.parallel value must be >= 1")
    return values


def default_engines() -> str:
    """The serial engine, and the batched one where this build has it."""
    import importlib.util

    return "1,8" if importlib.util.find_spec("appliance.chat.batching") is not None else "1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--users", type=int, default=20, help="concurrent staff users (20)")
    parser.add_argument(
        "--duration", type=float, default=300, help="seconds of load per engine (300)"
    )
    parser.add_argument("--match", default="", help="only filings whose name contains this")
    parser.add_argument("--limit", type=int, default=0, help="only the first N filings (0: all)")
    parser.add_argument(
        "--generated", type=int, default=0, help="use N generated documents instead of sec10q"
    )
    parser.add_argument(
        "--engines",
        type=engines,
        default=default_engines(),
        help="chat.parallel values to run side by side, the baseline first (1: the serial "
        "engine; default 1, and 1,8 where the batched engine is built in)",
    )
    parser.add_argument(
        "--asks",
        type=int,
        default=8,
        help="`appliance ask` commands run one by one, then at once, per engine (8; 0: skip)",
    )
    parser.add_argument(
        "--queue-limit", type=int, help="service.queue_limit for the runs (default: the setting)"
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
    if (
        args.users < 1
        or args.duration <= 0
        or args.limit < 0
        or args.generated < 0
        or args.asks < 0
        or (args.queue_limit is not None and args.queue_limit < 0)
    ):
        print(
            "--users >= 1, --duration > 0, --limit >= 0, --generated >= 0, --asks >= 0, "
            "--queue-limit >= 0",
            file=sys.stderr,
        )
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
    ok = all(
        e["errors"] == 0 and e["service_alive_after"] and not (e["asks"] or {}).get("failures")
        for e in result["engines"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
