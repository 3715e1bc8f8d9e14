"""A second writer on a data folder that a running process owns is refused within 2 s, with a
message naming the owner, measured end to end with real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.api import ServiceClient

ROOT = Path(__file__).resolve().parents[2]
LIMIT_S = 2.0

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def appliance(*args: str) -> list[str]:
    return [sys.executable, "-m", "appliance.cli", *args]


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    out.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    return out


def refused_within(command: list[str], owner_pid: int, owner_role: str) -> float:
    started = time.monotonic()
    done = subprocess.run(
        command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60, check=False
    )
    seconds = time.monotonic() - started
    print(f"{' '.join(command[3:5])}: refused in {seconds:.2f} s: {done.stderr.strip()}")
    assert done.returncode == 1, done.stderr
    assert f"in use by process {owner_pid} ({owner_role}" in done.stderr
    assert seconds < LIMIT_S
    return seconds


def test_a_second_serve_is_refused_naming_the_running_service(tmp_path: Path) -> None:
    data, docs = tmp_path / "data", tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\n\nThe office opens at 8.\n")
    owner = subprocess.Popen(
        appliance(
            "--data-dir", str(data), "serve", str(docs), "--port", "0", "--metrics-port", "0"
        ),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while ServiceClient.find(data) is None:
            assert owner.poll() is None, "the owner exited"
            assert time.monotonic() < deadline, "the owner did not start serving"
            time.sleep(0.2)
        for name in ("serve", "watch"):
            refused_within(
                appliance("--data-dir", str(data), name, str(docs), "--port", "0"),
                owner.pid,
                "appliance serve",
            )
        # `ingest` is not a second writer here: it asks the running service to reconcile
        done = subprocess.run(
            appliance("--data-dir", str(data), "ingest", str(docs), "--json"),
            cwd=ROOT,
            env=env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    finally:
        owner.terminate()
        owner.wait(timeout=60)


def test_a_second_ingest_is_refused_naming_the_running_ingest(tmp_path: Path) -> None:
    """The owner is a one-shot ingest (it serves no API), held in place at its lock."""
    data, docs = tmp_path / "data", tmp_path / "docs"
    docs.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, pathlib; from appliance.core.ownership import DataDirLock; "
            "DataDirLock(pathlib.Path(sys.argv[1]), 'appliance ingest').acquire(); "
            "print('owned', flush=True); sys.stdin.read()",
            str(data),
        ],
        cwd=ROOT,
        env=env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "owned"
        refused_within(
            appliance("--data-dir", str(data), "ingest", str(docs)), holder.pid, "appliance ingest"
        )
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
