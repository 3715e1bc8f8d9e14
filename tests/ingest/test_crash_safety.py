"""kill -9 during ingestion, many times, with the folder changing between runs: after a final
run the index equals the folder exactly (no missing, duplicate or stale chunks)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ingest.crash_worker import open_indexer
from tests.ingest.exactness import index_problems

ROOT = Path(__file__).resolve().parents[2]


def run_worker(data: Path, docs: Path, kill_after: float | None) -> int:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.ingest.crash_worker", str(data), str(docs)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    if kill_after is None:
        proc.communicate(timeout=600)
        return proc.wait()
    assert proc.stdout is not None
    proc.stdout.readline()  # start-up and recovery are done: the kill lands in the writing
    try:
        return proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        return proc.wait()


def churn(docs: Path, rng: random.Random, step: int) -> None:
    files = sorted(p for p in docs.rglob("*") if p.is_file())
    for path in rng.sample(files, min(80, len(files))):
        action = rng.choice(["modify", "rename", "delete"])
        if action == "modify":
            path.write_text(
                path.read_text() + f"\nrevision {step} adds a sentence about item {step}.\n"
            )
        elif action == "rename":
            path.rename(path.with_name(f"r{step}-{path.name}"))
        else:
            path.unlink()
    for i in range(10):
        (docs / f"new-{step}-{i}.md").write_text(
            f"# New {step}\n\n" + "fresh words " * (20 + i) + "\n"
        )


@pytest.mark.slow
@pytest.mark.integration
def test_kill_9_at_random_points_leaves_an_exact_index(tmp_path: Path) -> None:
    rng = random.Random(1234)
    docs, data = tmp_path / "docs", tmp_path / "data"
    for i in range(200):
        sub = docs / f"team{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        body = "\n\n".join(
            f"Paragraph {j} of document {i} with some policy words." for j in range(8 + i % 20)
        )
        (sub / f"doc{i}.md").write_text(f"# Document {i}\n\n{body}\n")
    kills = 0
    for step in range(10):
        # Short delays: on an idle machine a round of changes is written in well under a second.
        code = run_worker(data, docs, kill_after=rng.uniform(0.02, 0.4))
        kills += code == -signal.SIGKILL
        churn(docs, rng, step)
    print(f"{kills} of 10 runs killed mid-write")
    assert kills >= 5, "the worker finished before most kills: make the corpus larger"
    assert run_worker(data, docs, kill_after=None) == 0
    indexer, resources = open_indexer(data, docs)
    try:
        assert index_problems(indexer) == []
        assert indexer.recover() == {"pending": 0, "doomed": 0, "stale": 0, "reindex": 0}
        started = time.monotonic()
        assert indexer.reconcile().added == 0
        assert time.monotonic() - started < 60
    finally:
        for resource in resources:
            resource.close()
