"""The gate compares the serving model and a candidate on the same questions.

The chat models here are scripted stand-ins at the ChatModel seam: the gate's arithmetic and
verdicts are under test, not generation (the end-to-end test gates real GGUF files)."""

from __future__ import annotations

import json
from collections.abc import Generator
from pathlib import Path

from appliance.chat.base import BaseChatModel, Usage
from appliance.core.evaluation import GoldenItem
from appliance.core.protocols import ChatMessage, GenerationParams
from finetune.gate import heldout_prompt, run_gate, write_report


class Scripted(BaseChatModel):
    """Answers each question with ``answers[question]``."""

    def __init__(self, answers: dict[str, str]) -> None:
        super().__init__()
        self.answers = answers

    @property
    def name(self) -> str:
        return "scripted"

    @property
    def context_length(self) -> int:
        return 2048

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def _generate(
        self, messages: list[ChatMessage], params: GenerationParams
    ) -> Generator[str, None, Usage]:
        yield self.answers.get(messages[-1]["content"], "I do not know.")
        return Usage("scripted", 1, 1, "stop")

    def _close(self) -> None:
        pass


def record(question: str, answer: str) -> dict:
    return {
        "id": question,
        "messages": [
            {"role": "system", "content": "Answer from the context."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ],
    }


HELDOUT = [
    record("How long are audit logs kept?", "Seven years.\nSource: policy.md"),
    record("Who approves leave?", "The line manager.\nSource: hr.md"),
]


def models(good: dict[str, str], bad: dict[str, str]):  # type: ignore[no-untyped-def]
    paths = {Path("/models/reference.gguf"): bad, Path("/models/candidate.gguf"): good}
    return lambda path: Scripted(paths[path])


def test_heldout_prompt_is_everything_before_the_last_answer() -> None:
    prompt, reference = heldout_prompt(HELDOUT[0])
    assert [m["role"] for m in prompt] == ["system", "user"]
    assert reference == "Seven years.\nSource: policy.md"


def test_a_better_candidate_passes_and_a_worse_one_is_rejected(tmp_path: Path) -> None:
    good = {
        "How long are audit logs kept?": "Seven years.\nSource: policy.md",
        "Who approves leave?": "The line manager.\nSource: hr.md",
    }
    bad = {"How long are audit logs kept?": "Seven years."}
    better = run_gate(
        reference=("base", Path("/models/reference.gguf")),
        candidate=("v1", Path("/models/candidate.gguf")),
        load=models(good, bad),
        heldout=HELDOUT,
    )
    assert better.passed, better.failures
    metrics = better.metrics()["heldout"]
    assert metrics["candidate"]["answer_f1"] > metrics["reference"]["answer_f1"]

    worse = run_gate(
        reference=("base", Path("/models/candidate.gguf")),
        candidate=("v2", Path("/models/reference.gguf")),
        load=models(good, bad),
        heldout=HELDOUT,
        max_drop=2.0,
    )
    assert not worse.passed
    assert any(f.startswith("held-out: answer_f1 dropped") for f in worse.failures)
    json_path, html_path = write_report(worse, tmp_path)
    saved = json.loads(json_path.read_text())
    assert saved["passed"] is False
    assert saved["failures"] == worse.failures
    page = html_path.read_text()
    assert "rejected" in page
    assert "<script" not in page


def test_the_golden_set_counts_too() -> None:
    item = GoldenItem("q1", "What is the retention?", "seven years", ("policy.md",))
    scores = {
        Path("/models/reference.gguf"): {"recall_at_k": 1.0, "answer_f1": 0.60},
        Path("/models/candidate.gguf"): {"recall_at_k": 1.0, "answer_f1": 0.55},
    }

    def golden(path: Path, items: object) -> dict:
        base = {"mrr": 1.0, "answer_containment": 0.5, "citation_precision": 1.0}
        return {"metrics": base | scores[path], "questions": [{"question": item.question}]}

    report = run_gate(
        reference=("base", Path("/models/reference.gguf")),
        candidate=("v1", Path("/models/candidate.gguf")),
        load=models({}, {}),
        heldout=[],
        golden=[item],
        golden_evaluator=golden,
    )
    assert report.failures == ["golden: answer_f1 dropped 5.0 points (0.600 -> 0.550)"]


def test_nothing_to_evaluate_is_a_rejection() -> None:
    report = run_gate(
        reference=("base", Path("/a")),
        candidate=("v1", Path("/b")),
        load=models({}, {}),
        heldout=[],
    )
    assert not report.passed


def test_a_drop_in_faithfulness_rejects_a_candidate() -> None:
    item = GoldenItem("q1", "What is the retention?", "seven years", ("policy.md",))
    faithfulness = {Path("/models/reference.gguf"): 0.97, Path("/models/candidate.gguf"): 0.94}

    def golden(path: Path, items: object) -> dict:
        base = {"recall_at_k": 1.0, "mrr": 1.0, "answer_f1": 0.6, "answer_containment": 0.5}
        metrics = base | {"citation_precision": 1.0, "faithfulness": faithfulness[path]}
        return {"metrics": metrics, "questions": [{"question": item.question}]}

    report = run_gate(
        reference=("base", Path("/models/reference.gguf")),
        candidate=("v1", Path("/models/candidate.gguf")),
        load=models({}, {}),
        heldout=[],
        golden=[item],
        golden_evaluator=golden,
    )
    assert report.failures == ["golden: faithfulness dropped 3.0 points (0.970 -> 0.940)"]
