"""The command-line contract: JSON shapes, exit codes, and the core service as the data
folder's one owner. Real model, real store, real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.api import SERVICE_FILE, ServiceClient
from appliance.cli import main

ROOT = Path(__file__).resolve().parents[2]
POLICY = (
    "# Records policy\n\n## Retention\n\nThe appliance retains audit logs for 7 years under "
    "policy AP-12.\n\n## Access\n\nOnly administrators may export audit logs.\n"
)


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    (folder / "legal").mkdir(parents=True)
    (folder / "policy.md").write_text(POLICY)
    (folder / "legal" / "contract.txt").write_text(
        "SERVICE AGREEMENT\n\nThe supplier shall deliver the goods within 30 days of the order.\n"
    )
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    return folder


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_ingest_status_search_json(docs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "ingest", str(docs), "--json")
    assert code == 0
    report = json.loads(out)
    assert {
        "added",
        "updated",
        "removed",
        "unchanged",
        "failed",
        "chunks",
        "seconds",
    } <= report.keys()
    assert (report["added"], report["failed"]) == (2, 1)

    code, out, _ = run_cli(capsys, "status", "--json")
    status = json.loads(out)
    assert code == 0
    assert (status["documents"], status["chunks"] > 0) == (2, True)
    assert status["failed"][0]["path"] == "broken.pdf"
    assert status["failed"][0]["reason"]

    code, out, _ = run_cli(
        capsys, "search", "How long are audit logs retained?", "-k", "2", "--json"
    )
    result = json.loads(out)
    assert code == 0
    top = result["results"][0]
    assert (top["path"], top["heading"]) == ("policy.md", "Records policy > Retention")
    assert {"path", "page", "heading", "score", "text"} <= top.keys()

    queries = docs.parent / "q.jsonl"
    queries.write_text(
        json.dumps({"question": "When must goods be delivered?", "id": 1})
        + "\n"
        + json.dumps({"question": "Who may export audit logs?"})
        + "\n"
    )
    code, out, _ = run_cli(capsys, "search", "--queries", str(queries), "-k", "1")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["results"][0]["path"] for line in lines] == ["legal/contract.txt", "policy.md"]

    code, out, _ = run_cli(capsys, "ingest", str(docs), "--json")
    assert json.loads(out)["unchanged"] == 2


def test_errors_go_to_stderr_with_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "ingest", str(tmp_path / "missing"), "--json")
    assert code != 0
    assert out == ""
    assert "does not exist" in err
    code, out, err = run_cli(capsys, "status", "--json")
    assert code == 0
    assert json.loads(out)["documents"] == 0


def appliance(*argv: str, data: Path, **kwargs) -> subprocess.Popen:  # type: ignore[no-untyped-def,type-arg]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("APPLIANCE_") and k != "INVOCATION_ID"  # not under systemd here
    }
    env["APPLIANCE_DATA_DIR"] = str(data)
    return subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_python_dash_m_appliance_is_the_appliance_command(tmp_path: Path) -> None:
    """``python -m appliance`` runs the same ``main`` as the installed ``appliance`` script."""
    proc = appliance("status", "--json", data=tmp_path / "data")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert json.loads(out)["documents"] == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["APPLIANCE_DATA_DIR"] = str(tmp_path / "data")
    module = subprocess.run(
        [sys.executable, "-m", "appliance", "status", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert module.returncode == 0, module.stderr
    assert json.loads(module.stdout) == json.loads(out)
    bad = subprocess.run(
        [sys.executable, "-m", "appliance", "no-such-command"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "invalid choice" in bad.stderr


@pytest.fixture
def service(docs: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path]]:  # type: ignore[type-arg]
    data = tmp_path / "svc-data"
    proc = appliance("watch", str(docs), "--port", "0", "--metrics-port", "0", data=data)
    try:
        deadline = time.monotonic() + 120
        client = None
        while time.monotonic() < deadline and client is None:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            client = ServiceClient.find(data)
            time.sleep(0.2)
        assert client is not None, "the core service did not start"
        while client.call("GET", "/status")["documents"] < 2 and time.monotonic() < deadline:
            time.sleep(0.3)
        yield proc, data
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.integration
def test_core_service_owns_the_data_folder(service, docs: Path) -> None:  # type: ignore[no-untyped-def]
    proc, data = service
    # status and search are answered by the running service
    status = appliance("status", "--json", data=data)
    out, err = status.communicate(timeout=60)
    assert status.returncode == 0, err
    parsed = json.loads(out)
    assert parsed["documents"] == 2
    assert parsed["watcher"]["state"] in ("ok", "degraded")
    search = appliance("search", "supplier delivery days", "--json", "-k", "1", data=data)
    out, err = search.communicate(timeout=60)
    assert json.loads(out)["results"][0]["path"] == "legal/contract.txt"

    # a second writer is refused quickly, naming the owner
    started = time.monotonic()
    second = appliance("watch", str(docs), "--port", "0", "--metrics-port", "0", data=data)
    out, err = second.communicate(timeout=30)
    assert second.returncode != 0
    assert time.monotonic() - started < 2.0 + 1.5  # interpreter start-up on a loaded CI box
    assert f"process {proc.pid}" in err
    assert "appliance watch" in err

    # the watcher picks up a new file
    (docs / "new.md").write_text("# Holidays\n\nThe office is closed on 24 December.\n")
    client = ServiceClient.find(data)
    assert client is not None
    deadline = time.monotonic() + 60
    while client.call("GET", "/status")["documents"] < 3 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert client.call("GET", "/status")["documents"] == 3

    # questions are answered by the service, streamed
    ask = appliance("ask", "When must the supplier deliver the goods?", "--stream", data=data)
    out, err = ask.communicate(timeout=300)
    assert ask.returncode == 0, err
    assert "contract.txt" in out

    # a clean stop removes the service file and releases the folder
    proc.terminate()
    assert proc.wait(timeout=60) == 0
    assert not (data / SERVICE_FILE).exists()
    assert ServiceClient.find(data) is None


@pytest.mark.slow
def test_ask_and_eval_commands(
    docs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(capsys, "ingest", str(docs), "--json")[0] == 0
    code, out, err = run_cli(
        capsys, "ask", "How long does the appliance retain audit logs?", "--json"
    )
    assert code == 0, err
    answer = json.loads(out)
    assert {"answer", "sources", "abstained", "timings"} <= answer.keys()
    assert not answer["abstained"]
    assert answer["sources"][0]["path"] == "policy.md"
    assert "7" in answer["answer"]

    code, out, _ = run_cli(capsys, "ask", "What is the airspeed of an unladen swallow?", "--json")
    assert json.loads(out)["abstained"] is True

    golden = tmp_path / "golden.jsonl"
    golden.write_text(
        json.dumps(
            {
                "id": "g1",
                "question": "How long are audit logs retained?",
                "answer": "Audit logs are retained for 7 years under policy AP-12.",
                "evidence_doc": ["policy.md"],
            }
        )
        + "\n"
        + json.dumps(
            {
                "id": "g2",
                "question": "Within how many days must the supplier deliver the goods?",
                "answer": "Within 30 days of the order.",
                "evidence_doc": ["contract.txt"],
            }
        )
        + "\n"
    )
    report = tmp_path / "report.html"
    code, out, _ = run_cli(capsys, "eval", str(golden), "--json", "--report", str(report))
    assert code == 0
    result = json.loads(out)
    metrics = result["metrics"]
    assert set(metrics) >= {
        "recall_at_k",
        "mrr",
        "answer_f1",
        "answer_containment",
        "citation_precision",
        "abstention_rate",
        "ttft_p50_s",
        "tokens_per_s",
    }
    assert metrics["recall_at_k"] == 1.0
    assert len(result["questions"]) == 2
    page = report.read_text()
    assert "<script" not in page
    assert "How long are audit logs retained?" in page

    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"metrics": {**metrics, "recall_at_k": 1.5}}))
    code, _, err = run_cli(
        capsys, "eval", str(golden), "--baseline", str(baseline), "--max-drop", "2"
    )
    assert code != 0
    assert "recall_at_k dropped" in err


def test_a_local_install_creates_owner_only_data(docs: Path, tmp_path: Path) -> None:
    """Index text, state and logs hold the documents: whatever the shell's umask, nothing in
    the data folder is readable by other accounts."""
    data = tmp_path / "private-data"
    proc = appliance("ingest", str(docs), "--json", data=data, preexec_fn=lambda: os.umask(0o022))
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    loose = [
        str(p.relative_to(data))
        for p in [data, *data.rglob("*")]
        if not p.is_symlink() and p.stat().st_mode & 0o077
    ]
    assert loose == []
