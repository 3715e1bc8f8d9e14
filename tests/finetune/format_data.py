"""A synthetic task that fine-tuning must teach: every answer ends with ``Source: <file>``.

The user turn carries one context passage tagged with its file name and a question about it;
the assistant answers in one sentence and ends with a line naming that file. The base model
never does this on its own, so format adherence on unseen questions (other facts, other file
names) measures whether a run taught anything. Shared by the training tests and the end-to-end
fine-tuning test.
"""

from __future__ import annotations

import random
import re
from typing import Any

SYSTEM = "You answer questions about company documents using only the given context."

RUN_CONFIG = """\
max_steps: 24
learning_rate: 1.0e-3
batch_size: 4
max_seq_len: 256
save_every: 12
"""
"""The run config measured to teach the format to SmolLM2-135M (the end-to-end test and
``benchmarks/finetune_end_to_end.py``, which overrides the steps)."""

_SUBJECTS = [
    "audit logs",
    "backup tapes",
    "visitor badges",
    "expense reports",
    "laptop images",
    "customer contracts",
    "payroll records",
    "incident tickets",
    "access reviews",
    "vendor invoices",
    "training records",
    "firewall rules",
    "safety inspections",
    "encryption keys",
    "meeting minutes",
    "travel requests",
    "server patches",
    "parking permits",
    "insurance claims",
    "purchase orders",
    "job applications",
    "maintenance logs",
    "risk assessments",
    "software licenses",
    "shipping manifests",
    "lab samples",
    "board resolutions",
    "tax filings",
    "warranty claims",
    "patient consent forms",
]
_OWNERS = [
    "the security team",
    "the finance office",
    "the facilities desk",
    "human resources",
    "the compliance officer",
    "the IT service desk",
    "the legal department",
    "the plant manager",
    "the records office",
    "the procurement team",
]
_UNITS = ["days", "weeks", "months", "years"]
_PREFIXES = [
    "policy",
    "standard",
    "handbook",
    "procedure",
    "guideline",
    "manual",
    "memo",
    "charter",
    "rulebook",
    "playbook",
]
_TOPICS = [
    "retention",
    "security",
    "finance",
    "travel",
    "safety",
    "privacy",
    "records",
    "it-ops",
    "facilities",
    "quality",
    "vendor",
    "hr",
    "legal",
    "audit",
    "payroll",
]
_EXTS = [".pdf", ".docx", ".md", ".txt", ".html"]


def _file_name(rng: random.Random) -> str:
    return (
        f"{rng.choice(_TOPICS)}-{rng.choice(_PREFIXES)}-{rng.randint(1, 99):02d}{rng.choice(_EXTS)}"
    )


def _fact(rng: random.Random) -> tuple[str, str, str]:
    """(context sentence, question, answer sentence) about one random subject."""
    subject = rng.choice(_SUBJECTS)
    kind = rng.randrange(4)
    if kind == 0:
        n, unit = rng.randint(2, 12), rng.choice(_UNITS)
        return (
            f"{subject.capitalize()} are kept for {n} {unit} and then destroyed.",
            f"How long are {subject} kept?",
            f"{subject.capitalize()} are kept for {n} {unit}.",
        )
    if kind == 1:
        owner = rng.choice(_OWNERS)
        return (
            f"Requests about {subject} are handled by {owner}.",
            f"Who handles requests about {subject}?",
            f"Requests about {subject} are handled by {owner}.",
        )
    if kind == 2:
        n = rng.randint(2, 9)
        return (
            f"Changes to {subject} need {n} approvals before they take effect.",
            f"How many approvals do changes to {subject} need?",
            f"Changes to {subject} need {n} approvals.",
        )
    day = rng.choice(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"])
    return (
        f"{subject.capitalize()} are reviewed every {day} morning.",
        f"When are {subject} reviewed?",
        f"{subject.capitalize()} are reviewed every {day} morning.",
    )


def make_format_record(rng: random.Random) -> tuple[dict[str, Any], str]:
    """One chat record in the dataset format and the file name its answer must cite."""
    file = _file_name(rng)
    context, question, answer = _fact(rng)
    user = f"Context:\n[{file}] {context}\n\nQuestion: {question}"
    record = {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user},
            {"role": "assistant", "content": f"{answer}\nSource: {file}"},
        ]
    }
    return record, file


def make_format_records(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` records, reproducible from ``seed``; each also holds its ``file`` (extra key)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        record, file = make_format_record(rng)
        out.append({**record, "file": file})
    return out


def adherence(answer: str, file: str) -> bool:
    """The answer's last non-empty line is exactly ``Source: <file>``."""
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    return bool(lines) and re.fullmatch(rf"Source:\s*{re.escape(file)}", lines[-1]) is not None
