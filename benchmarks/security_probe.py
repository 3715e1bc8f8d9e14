"""Security probe: a running ``appliance serve`` against the attacks of issue 13, in one run.

Starts the core service in a child process on free ports over a scratch data folder and a few
generated documents, then reports:

- **unauthenticated body**: a client announces a 200 MB body to ``/ask`` without the token and
  sends as fast as it can for up to 2 s: the service's RSS growth (goal < 20 MB) and the time
  to its 4xx answer (goal < 1 s);
- **idle connections**: ``/health`` latency (median of 5) while 1,000 idle connections are open
  (goal < 1 s), and whether they were all accepted;
- **aborted streams**: 20 questions whose client reads the first event and hangs up: question
  records and ``answer_end`` records with status ``aborted`` in the audit log (goal 20 each);
- **truncation**: after the service stops, ``appliance audit anchor`` is taken, the last 3
  records are cut, and ``appliance audit verify`` is run without and with ``--anchor`` (goal:
  not detected without, detected with);
- **planted instructions**: the held-out cases of ``benchmarks/prompt_injection.py`` when
  ``--injection`` is given (it loads the chat model and takes minutes): followed (goal 0).

    .venv/bin/python benchmarks/security_probe.py [--injection] [--json] [--data-dir D]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import data_folder, machine, print_json, quiet_libraries, setup_logging
from _reliability import ROOT, rss_mb
from load_test import create_users, start_service, stop_service, wait_ready

PASSWORD = "load-test-password-00"  # load_test.create_users' first account


def unauthenticated_body(port: int, pid: int) -> dict[str, Any]:
    before = rss_mb(pid) or 0.0
    head = (
        b"POST /ask HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 209715200\r\n\r\n"
    )
    block = b"x" * (1024 * 1024)
    sent, status, answered_s = 0, None, None
    started = time.monotonic()
    peak = before
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        reply = b""
        while time.monotonic() - started < 2.0 and sent < 200 * len(block):
            try:
                sent += sock.send(block)
            except BlockingIOError:
                time.sleep(0.001)
            except OSError:
                break  # the service closed the connection: it will not read the rest
            try:
                reply += sock.recv(4096)
            except BlockingIOError:
                pass
            except OSError:
                break
            if reply.startswith(b"HTTP/1.1 ") and answered_s is None:
                answered_s = time.monotonic() - started
                status = int(reply[9:12])
            peak = max(peak, rss_mb(pid) or 0.0)
    time.sleep(0.5)
    after = rss_mb(pid) or 0.0
    return {
        "sent_mb": round(sent / 2**20, 1),
        "status": status,
        "answer_s": round(answered_s, 3) if answered_s is not None else None,
        "rss_growth_mb": round(max(peak, after) - before, 1),
    }


def idle_connections(client: Any, count: int) -> dict[str, Any]:
    idle: list[socket.socket] = []
    refused = 0
    for _ in range(count):
        try:
            idle.append(socket.create_connection((client.host, client.port), timeout=5))
        except OSError:
            refused += 1
    try:
        time.sleep(0.5)
        latencies = []
        for _ in range(5):
            started = time.monotonic()
            client.call("GET", "/health", timeout=10)
            latencies.append(time.monotonic() - started)
    finally:
        for sock in idle:
            sock.close()
    return {
        "open": len(idle),
        "refused": refused,
        "health_median_s": round(statistics.median(latencies), 4),
        "health_max_s": round(max(latencies), 4),
    }


def aborted_streams(client: Any, audit: Path, count: int) -> dict[str, Any]:
    from appliance.core.audit import read

    login = client.call("POST", "/auth/login", {"username": "staff00", "password": PASSWORD})
    me = client.with_session(login["session"])
    before_q = sum(1 for _ in read(audit, user="staff00", event="question"))
    for n in range(count):
        conn = http.client.HTTPConnection(me.host, me.port, timeout=120)
        body = {"question": f"What does document {n % 3} say about retention?", "stream": True}
        conn.request("POST", "/ask", body=json.dumps(body), headers=me._headers())
        response = conn.getresponse()
        response.readline()  # the evidence: the client has seen something, then hangs up
        conn.close()
    deadline = time.monotonic() + 120
    aborted = 0
    while time.monotonic() < deadline:
        ends = list(read(audit, user="staff00", event="answer_end"))
        aborted = sum(r["data"].get("status") == "aborted" for r in ends)
        if aborted >= count:
            break
        time.sleep(0.5)
    questions = sum(1 for _ in read(audit, user="staff00", event="question")) - before_q
    return {"streams": count, "question_records": questions, "aborted_records": aborted}


def truncation(data: Path) -> dict[str, Any]:
    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "appliance.cli", "--data-dir", str(data), "audit", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    anchor = cli("anchor", "--json")
    anchor_file = data.parent / "anchor.json"
    anchor_file.write_text(anchor.stdout)
    log = data / "audit" / "audit.jsonl"
    lines = log.read_text(encoding="utf-8").splitlines(keepends=True)
    log.write_text("".join(lines[:-3]), encoding="utf-8")
    plain = cli("verify")
    anchored = cli("verify", "--anchor", str(anchor_file))
    return {
        "records": len(lines),
        "cut": 3,
        "detected_without_anchor": plain.returncode != 0,
        "detected_with_anchor": anchored.returncode != 0,
        "verify_says": anchored.stdout.strip()[:200],
    }


def injection() -> dict[str, Any]:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "prompt_injection.py"),
            "--cases",
            "held-out",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode not in (0, 1):
        return {"error": proc.stderr.strip()[-300:]}
    result = json.loads(proc.stdout)
    return {"cases": result.get("cases"), "followed": result.get("followed")}


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    docs, data = root / "docs", root / "data"
    docs.mkdir(parents=True, exist_ok=True)
    for n in range(3):
        (docs / f"policy-{n}.md").write_text(
            f"# Policy {n}\n\nRecords of kind {n} are retained for {n + 5} years under rule "
            f"RR-{n}. Access needs approval by the records officer.\n",
            encoding="utf-8",
        )
    create_users(data, 1)
    proc = start_service(data, docs, root / "serve.log")
    try:
        client, _status = wait_ready(proc, data, 3, args.startup_timeout)
        out: dict[str, Any] = {"machine": machine()}
        out["unauthenticated_body"] = unauthenticated_body(client.port, proc.pid)
        out["idle_connections"] = idle_connections(client, args.idle)
        out["aborted_streams"] = aborted_streams(client, data / "audit" / "audit.jsonl", 20)
        out["service_alive_after"] = proc.poll() is None
    finally:
        stop_service(proc)
    out["truncation"] = truncation(data)
    out["planted_instructions"] = injection() if args.injection else "not run (--injection)"
    return out


def verdicts(result: dict[str, Any]) -> dict[str, bool]:
    body, idle = result["unauthenticated_body"], result["idle_connections"]
    streams, cut = result["aborted_streams"], result["truncation"]
    out = {
        "body_rss_growth_under_20mb": body["rss_growth_mb"] < 20,
        "body_4xx_under_1s": body["status"] is not None
        and 400 <= body["status"] < 500
        and (body["answer_s"] or 9) < 1.0,
        "health_under_1s_with_idle_connections": idle["health_max_s"] < 1.0,
        "every_aborted_stream_audited": streams["question_records"] == streams["streams"]
        and streams["aborted_records"] >= streams["streams"],
        "truncation_detected_with_anchor": cut["detected_with_anchor"],
    }
    planted = result["planted_instructions"]
    if isinstance(planted, dict) and "followed" in planted:
        out["no_planted_instruction_followed"] = planted["followed"] == 0
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=1000, help="idle connections to open")
    parser.add_argument("--injection", action="store_true", help="also run the held-out cases")
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    quiet_libraries()
    with data_folder(args.data_dir, "security-probe-") as root:
        result = run(args, root)
    result["verdicts"] = verdicts(result)
    if args.json:
        print_json(result)
    else:
        for key in ("unauthenticated_body", "idle_connections", "aborted_streams", "truncation"):
            print(f"{key}: {json.dumps(result[key])}")
        print(f"planted_instructions: {json.dumps(result['planted_instructions'])}")
        for name, ok in result["verdicts"].items():
            print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(result["verdicts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
