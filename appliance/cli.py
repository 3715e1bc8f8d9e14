"""The ``appliance`` command line: ``main(argv)`` parses, loads settings once and dispatches.

Errors become a message on stderr and a non-zero exit code here, and only here.
``--json`` output is one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance import __version__
from appliance.core.errors import ApplianceError, ServiceError, StoreLockedError
from appliance.core.settings import Settings, load_settings

if TYPE_CHECKING:
    from appliance.service import CoreService

log = logging.getLogger("appliance")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_HELD = 3
EXIT_GATE = 4


def _setup_logging(settings: Settings, verbose: bool, to_file: bool) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if to_file:
        path = settings.log_dir / "appliance.log"
        try:
            settings.log_dir.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(path, encoding="utf-8"))
        except OSError as exc:
            # A reader of the data folder, such as the UI unit (ProtectSystem=strict and no
            # ReadWritePaths), may write nowhere: its log is stderr, which is the journal there.
            print(f"note: not logging to {path} ({exc.strerror}): stderr only", file=sys.stderr)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    handlers[0].setLevel(logging.DEBUG if verbose else logging.WARNING)
    for noisy in ("httpx", "sentence_transformers", "transformers", "watchdog", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")


def _quiet_model_loading() -> None:
    """Progress bars of weight loading are noise on a terminal and in JSON pipelines."""
    import os

    # Environment only: importing transformers here took 2 s, before the data-folder lock was
    # even tried, so a second writer was refused late. The libraries read these at import.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# --- commands --------------------------------------------------------------------------------


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    from appliance.wiring import connect

    docs = Path(args.folder)
    _quiet_model_loading()
    with connect(settings, role="appliance ingest", docs_dir=docs) as appliance:
        progress = (
            _progress_bar()
            if appliance.kind == "local" and sys.stderr.isatty() and not args.json
            else None
        )
        try:
            report = appliance.reconcile(
                docs, confirm_deletions=args.confirm_deletions, progress=progress
            )
        finally:
            if progress is not None:
                progress.close()  # type: ignore[attr-defined]
    if args.json:
        _print_json(
            {
                k: report[k]
                for k in ("added", "updated", "removed", "unchanged", "failed", "chunks", "seconds")
            }
            | {"failures": report["failures"], "held_deletions": report["held_deletions"]}
        )
    else:
        print(
            f"added {report['added']}, updated {report['updated']}, removed {report['removed']}, "
            f"unchanged {report['unchanged']}, failed {report['failed']}; "
            f"{report['chunks']} chunks in {report['seconds']:.1f} s"
        )
        for failure in report["failures"]:
            print(f"  failed: {failure['path']}: {failure['reason']}")
    if report["held_deletions"]:
        print(
            f"refused to remove {report['held_deletions']} documents that disappeared at once; "
            "if they were really deleted, run again with --confirm-deletions",
            file=sys.stderr,
        )
        return EXIT_HELD
    return 0


class _Progress:
    def __init__(self) -> None:
        from tqdm import tqdm

        self._bar: Any = None
        self._tqdm = tqdm

    def __call__(self, rel: str, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = self._tqdm(total=total, unit="file", file=sys.stderr, dynamic_ncols=True)
        self._bar.n = done
        self._bar.set_postfix_str(rel[-40:], refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _progress_bar() -> Callable[[str, int, int], None]:
    return _Progress()


def cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    """The core service: the watcher, the local API, /metrics (``serve`` and ``watch``)."""
    from appliance.sdnotify import ServiceNotifier
    from appliance.wiring import open_core_service

    _quiet_model_loading()
    docs = Path(args.folder) if args.folder else settings.ingest.docs_dir
    docs.mkdir(parents=True, exist_ok=True)
    stop = _stop_on_signals()
    service = open_core_service(settings, docs, role=f"appliance {args.command}")
    # Under systemd (Type=notify): READY=1 once the API answers, watchdog pings while it does,
    # STOPPING=1 on the way out. A no-op in a terminal.
    notifier = ServiceNotifier(
        service.api.alive,
        status=lambda: f"watching {docs}; API on {settings.service.host}:{service.api.port}",
    )
    with service, notifier:
        _ensure_first_admin(service, settings)
        print(
            f"core service: watching {docs} (data in {settings.data_dir}), API on "
            f"{settings.service.host}:{service.api.port}, metrics on "
            f"http://{settings.metrics.host}:{settings.metrics.port}/metrics; Ctrl-C stops",
            file=sys.stderr,
        )
        service.run_until(stop)
    return 0


def _ensure_first_admin(service: CoreService, settings: Settings) -> None:
    from appliance.first_admin import ensure_first_admin

    ensure_first_admin(service.accounts, service.audit, settings.data_dir)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _ui_command(settings: Settings) -> list[str]:
    """The Streamlit server, locked down: loopback, headless, no telemetry, no file watcher,
    no error details, XSRF protection, an upload limit, the viewer toolbar."""
    app = Path(__file__).resolve().parents[1] / "ui" / "app.py"
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app),
        "--server.address",
        settings.ui.host,
        "--server.port",
        str(settings.ui.port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
        "--server.runOnSave",
        "false",
        "--client.showErrorDetails",
        "false",
        "--client.toolbarMode",
        "viewer",
        "--server.enableXsrfProtection",
        "true",
        "--server.enableCORS",
        "true",
        "--server.maxUploadSize",
        str(settings.ui.max_upload_mb),
        "--global.developmentMode",
        "false",
        "--theme.base",
        "light",
    ]


def _ui_env(settings: Settings) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["APPLIANCE_DATA_DIR"] = str(Path(settings.data_dir).resolve())
    env["STREAMLIT_BROWSER_GATHER_USAGE_STATS"] = "false"
    return env


def cmd_ui(args: argparse.Namespace, settings: Settings) -> int:
    """The Streamlit UI alone, as a client of a running core service."""
    import subprocess

    stop = _stop_on_signals()
    proc = subprocess.Popen(_ui_command(settings), env=_ui_env(settings))
    print(f"UI on http://{settings.ui.host}:{settings.ui.port}", file=sys.stderr)
    while not stop.wait(0.5):
        if proc.poll() is not None:
            return int(proc.returncode or 0)
    proc.terminate()
    proc.wait(timeout=30)
    return 0


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    """The whole appliance on one machine: the core service in this process, the UI beside it."""
    import subprocess

    from appliance.wiring import open_core_service

    _quiet_model_loading()
    docs = Path(args.docs) if args.docs else settings.ingest.docs_dir
    docs.mkdir(parents=True, exist_ok=True)
    stop = _stop_on_signals()
    service = open_core_service(settings, docs, role="appliance up")
    with service:
        _ensure_first_admin(service, settings)
        ui = subprocess.Popen(_ui_command(settings), env=_ui_env(settings))
        print(
            f"appliance up: UI http://{settings.ui.host}:{settings.ui.port}  metrics "
            f"http://{settings.metrics.host}:{settings.metrics.port}/metrics  documents {docs}; "
            "Ctrl-C stops",
            file=sys.stderr,
        )

        def watch_ui() -> None:
            ui.wait()
            stop.set()

        threading.Thread(target=watch_ui, name="ui-watch", daemon=True).start()
        try:
            service.run_until(stop)
        finally:
            if ui.poll() is None:
                ui.terminate()
                try:
                    ui.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    ui.kill()
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from appliance.wiring import connect

    with connect(settings, role="appliance status") as appliance:
        status: dict[str, Any] = dict(appliance.status())
    if args.json:
        _print_json(status)
        return 0
    print(f"documents: {status['documents']}   chunks: {status['chunks']}")
    watcher = status.get("watcher")
    if watcher:
        print(
            f"watcher: {watcher['state']}"
            + (f" ({watcher['reason']})" if watcher.get("reason") else "")
        )
    if status.get("held_deletions"):
        print(
            f"held deletions: {status['held_deletions']} "
            "(confirm with: appliance ingest FOLDER --confirm-deletions)"
        )
    parsing = status.get("parsing")
    if parsing:
        done, pages = parsing["pages_done"], parsing["pages"]
        print(f"OCR in progress: {parsing['path']}: page {done} of {pages}")
    for item in status.get("in_progress", []):
        print(f"in progress: {item}")
    for item in status.get("stuck", []):
        print(f"STUCK: {item['path']} in state {item['state']} for {item['seconds']} s")
    for item in status.get("failed", []):
        print(f"failed: {item['path']}: {item['reason']}")
    return 0


def _read_queries(path: Path) -> list[str]:
    questions = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            questions.append(str(record["question"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ApplianceError(
                f"{path}:{n}: each line must be a JSON object with a 'question' field"
            ) from exc
    return questions


def _result_view(hit: dict[str, Any]) -> dict[str, Any]:
    return {k: hit.get(k) for k in ("path", "page", "heading", "score", "text")}


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    from appliance.wiring import connect

    if args.queries:
        queries = _read_queries(Path(args.queries))
    elif args.query:
        queries = [args.query]
    else:
        raise ApplianceError("give a QUERY or --queries FILE")
    _quiet_model_loading()
    try:
        with connect(settings, role="appliance search") as appliance:
            batches: list[Any] = appliance.search(queries, args.k, args.mode)
    except StoreLockedError as exc:
        raise ServiceError(f"{exc}") from exc
    if args.queries:
        for question, hits in zip(queries, batches, strict=True):
            _print_json({"question": question, "results": [_result_view(h) for h in hits]})
        return 0
    hits = batches[0]
    if args.json:
        _print_json({"query": queries[0], "results": [_result_view(h) for h in hits]})
        return 0
    if not hits:
        print("no results (is anything indexed? see: appliance status)")
    for rank, hit in enumerate(hits, 1):
        where = f"page {hit['page']}" if hit.get("page") else (hit.get("heading") or "")
        print(f"[{rank}] {hit['path']}  {where}  score {hit['score']:.4f}")
        text = " ".join(str(hit["text"]).split())
        print(f"    {text[:300]}{'...' if len(text) > 300 else ''}")
    return 0


def _ask_events(settings: Settings, body: dict[str, Any]) -> Any:
    """Events of one question, from the running service or a local engine."""
    from appliance.wiring import connect

    _quiet_model_loading()
    with connect(settings, role="appliance ask") as appliance:
        yield from appliance.ask(
            body["question"], user=body["user"], conversation=body.get("conversation")
        )


def _current_user() -> str:
    from appliance.core.audit import local_identity

    return local_identity()


def cmd_ask(args: argparse.Namespace, settings: Settings) -> int:
    body = {"question": args.question, "user": _current_user(), "conversation": args.conversation}
    final: dict[str, Any] = {}
    streamed = False
    ahead = 0
    for event in _ask_events(settings, body):
        if event["type"] == "token" and args.stream and not args.json:
            sys.stdout.write(event["text"])
            sys.stdout.flush()
            streamed = True
        elif event["type"] == "queue" and args.stream and not args.json:
            # said when it changes (the service repeats it while it waits); 0: generation starts
            if event["position"] and event["position"] != ahead:
                print(f"waiting: {event['position']} ahead", file=sys.stderr, flush=True)
            ahead = event["position"]
        elif event["type"] == "answer":
            final = event
    answer = final["answer"]
    if args.json:
        _print_json(
            {
                "answer": answer["answer"],
                "sources": answer["sources"],
                "abstained": answer["abstained"],
                "timings": answer["timings"],
                "model": answer["model"],
                "conversation": final.get("conversation"),
                "claims": answer.get("claims", []),
                "unsupported_claims": answer.get("unsupported_claims", []),
                "mode": answer.get("mode", "generated"),
                # which version answered: the active one, or one this user may be served
                "served_by": answer.get("served_by") or {},
            }
        )
        return 0
    if streamed:
        # what was streamed is the raw, unchecked text; show the checked one when it differs
        print()
        if answer["redacted"] or answer.get("claims"):
            print("\nChecked answer:\n" + answer["answer"])
    else:
        print(answer["answer"])
    dropped = [c for c in answer.get("unsupported_claims", []) if not c.get("shown")]
    if dropped:
        print(
            f"({len(dropped)} sentence(s) the documents do not support were left out)",
            file=sys.stderr,
        )
    if answer["sources"]:
        print("\nSources:")
        for s in answer["sources"]:
            where = (
                f", page {s['page']}"
                if s.get("page")
                else (f", {s['heading']}" if s.get("heading") else "")
            )
            print(f"  [{s['number']}] {s['path']}{where}")
    served = answer.get("served_by") or {}
    if served.get("version"):
        print(f"(answered by model version {served['version']})", file=sys.stderr)
    print(
        f"(conversation {final.get('conversation')}; continue with --conversation)", file=sys.stderr
    )
    return 0


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    from appliance.core.evaluation import evaluate, gate, html_report, load_baseline, load_golden

    items = load_golden(Path(args.golden), args.limit)
    if args.mode:
        settings.answer.retrieval_mode = args.mode
    show = sys.stderr.isatty() and not args.json

    def progress(done: int, total: int) -> None:
        if show:
            print(f"\r{done}/{total} questions", end="", file=sys.stderr, flush=True)

    from appliance.wiring import connect

    _quiet_model_loading()
    with connect(settings, role="appliance ask") as appliance:
        if args.mode and appliance.kind == "remote":
            raise ApplianceError("--mode needs the index to itself: stop the core service first")
        # Through the service each question is a conversation of the user "eval"; locally
        # none is saved (as before the one interface).
        result = evaluate(
            items,
            lambda q: dict(appliance.answer(q, user="eval")),
            k=settings.answer.top_k,
            progress=progress,
        )
    if show:
        print(file=sys.stderr)
    if args.report:
        Path(args.report).write_text(
            html_report(result, f"Evaluation: {args.golden}"), encoding="utf-8"
        )
    failures = (
        gate(result["metrics"], load_baseline(Path(args.baseline)), args.max_drop)
        if args.baseline
        else []
    )
    result["gate"] = {"baseline": args.baseline, "max_drop": args.max_drop, "failures": failures}
    if args.json:
        _print_json(result)
    else:
        for name, value in result["metrics"].items():
            print(f"{name:20s} {value}")
        for failure in failures:
            print(f"REGRESSION: {failure}", file=sys.stderr)
    return EXIT_GATE if failures else 0


def _read_password(args: argparse.Namespace, prompt: str) -> str:
    import getpass

    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass(prompt)
    if getpass.getpass("again: ") != first:
        raise ApplianceError("the passwords do not match")
    return first


def cmd_users(args: argparse.Namespace, settings: Settings) -> int:
    """Through the data folder's appliance (``wiring.connect``): the running core service when
    there is one, else the accounts' SQLite in this process (no index is opened, so these
    commands need no ownership of the folder). Changes are audited where they are made, in
    the name of the OS user who ran the command."""
    from appliance.wiring import connect

    operator = _current_user()
    with connect(settings, role="appliance users") as appliance:
        action = args.action
        if action == "list":
            users = appliance.users()
            groups = appliance.groups()["groups"]
            if args.json:
                _print_json({"users": users, "groups": groups})
                return 0
            for user in users:
                flags = " (disabled)" if user.get("disabled") else ""
                names = ", ".join(user.get("groups") or [])
                print(f"{user['username']:24s} {user['role']:6s} groups: {names or '-'}{flags}")
            for group, collections in groups.items():
                print(f"group {group}: {', '.join(c or '(shared)' for c in collections)}")
            return 0
        if action == "add":
            role = "admin" if args.admin else "staff"
            password = _read_password(args, f"password for {args.name}: ")
            user = appliance.add_user(
                args.name, password, role=role, groups=args.groups or [], operator=operator
            )
            print(f"added {role} {user['username']}")
        elif action in ("disable", "enable"):
            appliance.update_user(args.name, disabled=action == "disable", operator=operator)
            print(f"{action}d {args.name}")
        elif action == "reset-password":
            password = _read_password(args, f"new password for {args.name}: ")
            appliance.update_user(args.name, password=password, operator=operator)
            print(f"password of {args.name} reset; their sessions ended")
        elif action == "role":
            appliance.update_user(args.name, role=args.role, operator=operator)
        elif action == "groups":
            appliance.update_user(args.name, groups=args.groups or [], operator=operator)
        elif action in ("grant", "revoke"):
            given = args.collections if action == "grant" else []
            taken = args.collections if action == "revoke" else []
            now = appliance.grant(args.group, given, taken, operator=operator)["groups"]
            print(f"group {args.group}: {', '.join(now.get(args.group, [])) or '-'}")
    return 0


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import datetime

    from appliance.core.audit import Anchor, load_key, parse_anchor, printable, read, verify

    path = settings.audit_path
    key_file = settings.audit.hmac_key_file
    key = load_key(key_file, settings.data_dir) if key_file is not None else None
    if args.verify == "anchor":
        result = verify(path, key=key)
        if not result.ok:
            print(f"TAMPERED: {result.records} records; {result.problem}", file=sys.stderr)
            return EXIT_ERROR
        anchor = {"count": result.records, "last_hash": result.last_hash}
        if args.json:
            _print_json(anchor)
        else:
            print(f"audit anchor count={anchor['count']} last_hash={anchor['last_hash']}")
        return 0
    if args.verify == "verify":
        given: str | Anchor | None = None
        if args.anchor:
            text = args.anchor
            if not re.fullmatch(r"[0-9a-f]{64}", text) and Path(text).is_file():
                text = Path(text).read_text(encoding="utf-8", errors="replace")
            given = parse_anchor(text)
        result = verify(path, anchor=given, key=key)
        if args.json:
            _print_json(
                {
                    "ok": result.ok,
                    "records": result.records,
                    "problem": result.problem,
                    "last_hash": result.last_hash,
                    "keyed_from": result.keyed_from,
                }
            )
        else:
            print(
                f"{'ok' if result.ok else 'TAMPERED'}: {result.records} records"
                + (f"; {result.problem}" if result.problem else "")
            )
            if key is not None and result.ok and result.keyed_from != 1 and result.records:
                keyed = result.keyed_from or "no record"
                print(f"note: records are keyed from seq {keyed} on (older ones predate the key)")
        return 0 if result.ok else EXIT_ERROR
    if args.anchor:
        raise ApplianceError("--anchor goes with `appliance audit verify`")
    since = datetime.fromisoformat(args.since) if args.since else None
    for record in read(path, since=since, user=args.user, event=args.event):
        if args.json:
            _print_json(record)
        else:
            # Stored strings come from outside (a failed sign-in's username): escape control
            # and format characters so they cannot forge or hide lines on the terminal.
            data = printable(json.dumps(record.get("data", {}), ensure_ascii=False))
            who = printable(str(record.get("user") or "-"))
            event = printable(str(record["event"]))
            print(f"{printable(str(record['time']))}  {who:16s} {event:16s} {data[:160]}")
    return 0


# --- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance", description="Offline domain assistant appliance."
    )
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    parser.add_argument("--config", type=Path, help="YAML settings file (or APPLIANCE_CONFIG)")
    parser.add_argument(
        "--data-dir", type=Path, help="data folder (or APPLIANCE_DATA_DIR; default ./data)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="index a folder once and exit")
    p.add_argument("folder", help="the documents folder")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--confirm-deletions", action="store_true", help="apply a mass deletion the guard held"
    )
    p.set_defaults(func=cmd_ingest, log_file=True)

    for name, text in (
        ("watch", "run the core service: keep the index equal to a folder"),
        ("serve", "run the core service (watcher, local API, /metrics), for systemd"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("folder", nargs="?", help="the documents folder (default: ingest.docs_dir)")
        p.add_argument("--port", type=int, help="port of the local API (default 8765; 0: any)")
        p.add_argument("--metrics-port", type=int, help="port of /metrics (default 9108)")
        p.set_defaults(func=cmd_watch, log_file=True)

    p = sub.add_parser("up", help="start everything: core service, chat UI and /metrics")
    p.add_argument("--docs", help="the documents folder (default: ingest.docs_dir)")
    p.add_argument("--ui-port", type=int, help="port of the UI (default 8501)")
    p.add_argument("--metrics-port", type=int, help="port of /metrics (default 9108)")
    p.add_argument("--port", type=int, help="port of the core service's local API (default 8765)")
    p.set_defaults(func=cmd_up, log_file=True)

    p = sub.add_parser("ui", help="run the Streamlit UI alone (a client of the core service)")
    p.add_argument("--ui-port", type=int, help="port of the UI (default 8501)")
    p.set_defaults(func=cmd_ui, log_file=True)

    p = sub.add_parser("status", help="documents, chunks and failures")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status, log_file=False)

    p = sub.add_parser("search", help="hybrid search over the index")
    p.add_argument("query", nargs="?", help="the query")
    p.add_argument("-k", type=int, default=5, help="number of results (default 5)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--mode", choices=["hybrid", "dense", "sparse"], default="hybrid")
    p.add_argument(
        "--queries", help='JSONL file of {"question": ...}; prints one JSON line per question'
    )
    p.set_defaults(func=cmd_search, log_file=False)

    p = sub.add_parser("ask", help="answer a question from the documents, with sources")
    p.add_argument("question")
    p.add_argument(
        "--json",
        action="store_true",
        help="print {answer, sources, abstained, timings, model, conversation, claims, "
        "unsupported_claims, mode, served_by: {version, name, audience}}",
    )
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--conversation", help="continue this conversation (follow-up questions)")
    p.set_defaults(func=cmd_ask, log_file=False)

    p = sub.add_parser("eval", help="measure retrieval and answers against a golden set")
    p.add_argument("golden", help="JSONL: {id, question, answer, evidence_doc}")
    p.add_argument("--json", action="store_true")
    p.add_argument("--report", help="write a self-contained HTML report here")
    p.add_argument("--baseline", help="a previous --json output to compare with")
    p.add_argument("--max-drop", type=float, default=2.0, help="points a headline metric may drop")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--mode", choices=["hybrid", "dense", "sparse"], help="retrieval mode")
    p.set_defaults(func=cmd_eval, log_file=False)

    p = sub.add_parser("users", help="accounts, roles, groups and collection grants")
    users = p.add_subparsers(dest="action", required=True)
    u = users.add_parser("list", help="users and groups")
    u.add_argument("--json", action="store_true")
    u = users.add_parser("add", help="create a user (the first admin: --admin)")
    u.add_argument("name")
    u.add_argument("--admin", action="store_true", help="give the admin role")
    u.add_argument("--groups", nargs="*", help="groups the user belongs to")
    u.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    for name in ("disable", "enable"):
        users.add_parser(name, help=f"{name} a user").add_argument("name")
    u = users.add_parser("reset-password", help="set a new password; ends the user's sessions")
    u.add_argument("name")
    u.add_argument("--password-stdin", action="store_true")
    u = users.add_parser("role", help="set a user's role")
    u.add_argument("name")
    u.add_argument("role", choices=["staff", "admin"])
    u = users.add_parser("groups", help="set a user's groups")
    u.add_argument("name")
    u.add_argument("groups", nargs="*")
    for name in ("grant", "revoke"):
        u = users.add_parser(name, help=f"{name} collections (top-level folders) to a group")
        u.add_argument("group")
        u.add_argument("collections", nargs="+")
    p.set_defaults(func=cmd_users, log_file=False)

    p = sub.add_parser("audit", help="read or verify the tamper-evident audit log")
    p.add_argument(
        "verify",
        nargs="?",
        choices=["verify", "anchor"],
        help="verify: check the hash chain; anchor: print the record count and last hash to "
        "keep outside the appliance",
    )
    p.add_argument(
        "--anchor",
        help="with verify: a hash, a file with `audit anchor --json`, or a journal line; fails "
        "when records up to it are missing or changed",
    )
    p.add_argument("--since", help="ISO date or time, e.g. 2026-11-01")
    p.add_argument("--user")
    p.add_argument("--event")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_audit, log_file=False)

    # Commands of the other subsystems register themselves; their modules import nothing heavy.
    import importlib

    for module in _COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
    return parser


# Each module has ``add_commands(sub)``, which adds subparsers with ``func`` and ``log_file``
# defaults like the ones above.
_COMMAND_MODULES = (
    "appliance.commands.finetune",
    "appliance.commands.dataset",
    "appliance.commands.models",
    "appliance.doctor",
    "appliance.commands.backup",
)


def _private_files() -> None:
    """Index text, conversations and logs are the organisation's documents: a local install
    creates them owner-only (umask 077), whatever the login shell's umask. Under systemd the
    unit's own ``UMask=0027`` applies (the admins' group reads the data folder)."""
    import os

    if not os.environ.get("INVOCATION_ID"):
        os.umask(0o077)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    _private_files()
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.data_dir is not None:
        overrides["data_dir"] = str(args.data_dir)
    if getattr(args, "port", None) is not None:
        overrides["service"] = {"port": args.port}
    if getattr(args, "metrics_port", None) is not None:
        overrides["metrics"] = {"port": args.metrics_port}
    if getattr(args, "ui_port", None) is not None:
        overrides["ui"] = {"port": args.ui_port}
    try:
        settings = load_settings(args.config, overrides=overrides)
        from appliance.wiring import prepare_process

        prepare_process(settings)
        _setup_logging(settings, args.verbose, args.log_file)
        started = time.monotonic()
        code = int(args.func(args, settings))
        log.debug("%s took %.2f s", args.command, time.monotonic() - started)
        return code
    except ApplianceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", EXIT_ERROR))  # e.g. 5: the disk is full
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
