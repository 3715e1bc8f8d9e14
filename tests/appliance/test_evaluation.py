import json
from pathlib import Path

import pytest

from appliance.errors import ApplianceError
from appliance.evaluation import (
    containment,
    evaluate,
    gate,
    html_report,
    load_baseline,
    load_golden,
    matches,
    token_f1,
)


def test_text_metrics() -> None:
    assert token_f1("The logs are kept for 7 years", "logs kept 7 years") == pytest.approx(
        0.8, abs=0.01
    )
    assert token_f1("", "") == 1.0
    assert containment("Logs are kept for 7 years under AP-12.", "7 years") == 1.0
    assert containment("nothing", "7 years") == 0.0
    assert matches("sec/2023 Q3 AAPL.pdf", ["2023 Q3 AAPL.pdf"])
    assert not matches("2023 Q2 AAPL.pdf", ["2023 Q3 AAPL.pdf"])


def golden(tmp_path: Path) -> Path:
    path = tmp_path / "golden.jsonl"
    rows = [
        {
            "id": "q1",
            "question": "How long are logs kept?",
            "answer": "7 years",
            "evidence_doc": ["policy.md"],
        },
        {
            "id": "q2",
            "question": "Who signs?",
            "answer": "The CFO",
            "evidence_doc": ["contract.pdf"],
            "extra": 1,
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def fake_answers(question: str) -> dict:  # type: ignore[type-arg]
    if "logs" in question:
        return {
            "answer": "Logs are kept for 7 years [1].",
            "abstained": False,
            "retrieved": [{"path": "other.md"}, {"path": "policy.md"}],
            "sources": [{"path": "policy.md", "page": None}],
            "timings": {"ttft_s": 0.5, "total_s": 1.0, "tokens_per_s": 40.0},
        }
    return {
        "answer": "The documents do not cover this question.",
        "abstained": True,
        "retrieved": [{"path": "x.md"}],
        "sources": [],
        "timings": {"total_s": 0.1},
    }


def test_evaluate_gate_and_report(tmp_path: Path) -> None:
    items = load_golden(golden(tmp_path))
    result = evaluate(items, fake_answers, k=5)
    m = result["metrics"]
    assert m["recall_at_k"] == 0.5
    assert m["mrr"] == 0.25
    assert m["citation_precision"] == 1.0
    assert m["abstention_rate"] == 0.5
    assert m["ttft_p50_s"] == 0.5
    assert m["answer_containment"] == 0.5
    baseline = tmp_path / "base.json"
    baseline.write_text(json.dumps({"metrics": {**m, "recall_at_k": 0.53}}))
    assert gate(m, load_baseline(baseline), 2.0)[0].startswith("recall_at_k dropped 3.0 points")
    assert gate(m, load_baseline(baseline), 5.0) == []
    page = html_report(result)
    assert "<script" not in page
    assert "http" not in page
    assert "How long are logs kept?" in page


def test_report_escapes_document_text(tmp_path: Path) -> None:
    items = load_golden(golden(tmp_path))
    result = evaluate(
        items, lambda q: fake_answers(q) | {"answer": "<script>alert(1)</script>"}, k=5
    )
    assert "<script>alert(1)" not in html_report(result)


def test_bad_golden_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"no_question": 1}\n')
    with pytest.raises(ApplianceError, match="question"):
        load_golden(bad)
    with pytest.raises(ApplianceError, match="cannot read"):
        load_golden(tmp_path / "missing.jsonl")
