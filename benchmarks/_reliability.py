"""Helpers of the reliability benchmarks (kill -9, churn, load): corpora, exactness, memory.

The exact comparison of index and folder is the one the ingestion tests rely on
(``tests/ingest/exactness.py``); it is imported from there rather than copied, so a benchmark and
a test can never disagree on what "exact" means. Its problems are counted here by kind: missing,
duplicate and stale.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# ``python benchmarks/NAME.py`` puts only benchmarks/ on sys.path; the exactness check lives in
# the test package at the repository root.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TOPICS = (
    "retention",
    "procurement",
    "onboarding",
    "incident response",
    "expenses",
    "travel",
    "data protection",
    "vendor review",
    "access control",
    "payroll",
    "backups",
    "training",
)
WORDS = [
    "policy",
    "staff",
    "manager",
    "approval",
    "record",
    "quarterly",
    "annual",
    "review",
    "audit",
    "request",
    "form",
    "ledger",
    "budget",
    "contract",
    "supplier",
    "invoice",
    "deadline",
    "exception",
    "escalation",
    "committee",
    "register",
    "owner",
    "archive",
    "schedule",
    "report",
    "notice",
    "evidence",
    "control",
    "register",
    "system",
    "account",
]


def document_text(n: int, rng: random.Random, *, revision: int = 0) -> str:
    """A small distinct Markdown document (about one chunk of the default chunking): a heading,
    a few sentences that name its number, and words drawn from a fixed vocabulary."""
    topic = TOPICS[n % len(TOPICS)]
    sentences = [
        f"Policy note {n} (revision {revision}) covers {topic} for team {n % 7}.",
        f"Requests under note {n} are approved within {3 + n % 11} working days.",
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 45))) + ".",
        f"The owner of note {n} is unit {n * 13 % 97} and the reference is REF-{n:05d}-{revision}.",
    ]
    return f"# Note {n}: {topic}\n\n" + " ".join(sentences) + "\n"


def exactness(indexer: Any) -> dict[str, Any]:
    """Index against folder: counts of missing, duplicate and stale items, and the problems."""
    from tests.ingest.exactness import folder_hashes, index_problems

    problems = index_problems(indexer)
    missing = duplicate = stale = 0
    for problem in problems:
        count = int(problem.split()[0]) if problem[0].isdigit() else 1
        if problem.startswith("missing or outdated") or "missing from the store" in problem:
            missing += count
        elif problem.startswith("duplicate"):
            duplicate += count
        else:  # stale documents, stale points, leftover pending/doomed rows, old versions
            stale += count
    documents, chunks = indexer.state.counts(indexer.collection)
    files = indexer.state.files(indexer.collection)
    return {
        "folder_files": len(folder_hashes(indexer)),
        # the exactness check leaves failed files out of the expected set: say how many
        "failed_files": sum(1 for row in files.values() if row.state == "failed"),
        "documents": documents,
        "chunks": chunks,
        "store_points": indexer.store.count(),
        "missing": missing,
        "duplicate": duplicate,
        "stale": stale,
        "problems": problems[:20],
    }


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MiB, from /proc (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def slope_per_min(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) samples, in MiB per minute."""
    if len(samples) < 2:
        return None
    n = len(samples)
    mx = sum(t for t, _ in samples) / n
    my = sum(v for _, v in samples) / n
    var = sum((t - mx) ** 2 for t, _ in samples)
    if var == 0:
        return None
    cov = sum((t - mx) * (v - my) for t, v in samples)
    return round(60 * cov / var, 3)
