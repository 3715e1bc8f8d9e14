import json
from pathlib import Path

import pytest

from appliance.core.errors import ApplianceError
from appliance.core.evaluation import (
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


def checked(answer: str, claims: list[dict], sources: list[str], mode: str = "generated") -> dict:
    return {
        "answer": answer,
        "abstained": False,
        "mode": mode,
        "claims": claims,
        "unsupported_claims": [c for c in claims if not c["supported"]],
        "sources": [{"path": "policy.md", "text": t} for t in sources],
        "retrieved": [{"path": "policy.md", "text": t} for t in sources],
        "timings": {},
    }


def claim(text: str, supported: bool, shown: bool) -> dict:
    return {"text": text, "supported": supported, "shown": shown, "reason": ""}


def test_verification_metrics_count_what_is_shown(tmp_path: Path) -> None:
    items = load_golden(golden(tmp_path))
    passage = "Audit logs are kept for 7 years under policy AP-12 (in millions: 52,857)."
    results = {
        # one sentence dropped, one shown: faithful; its figure is in the passage
        items[0].question: checked(
            "Logs are kept for 7 years [1].",
            [
                claim("Logs are kept for 7 years [1].", True, True),
                claim("They cost $9 million [1].", False, False),
            ],
            [passage],
        ),
        # flagged: an unsupported sentence shown, with a figure no source states
        items[1].question: checked(
            "Logs are kept for 7 years [1]. [unverified] They cost $9 million [1].",
            [
                claim("Logs are kept for 7 years [1].", True, True),
                claim("They cost $9 million [1].", False, True),
            ],
            [passage],
        ),
    }
    result = evaluate(items, lambda q: results[q], k=5)
    m = result["metrics"]
    assert m["faithfulness"] == pytest.approx(2 / 3, abs=1e-4)  # 3 sentences shown, 2 supported
    assert m["unsupported_number_rate"] == pytest.approx(
        1 / 3, abs=1e-4
    )  # 7, 7 and $9 million shown
    assert m["quoted_rate"] == 0.0
    assert 0.0 <= m["evidence_recall"] <= 1.0
    assert "faithfulness" in html_report(result)
    assert gate(m, {"faithfulness": 0.68}, max_drop=2.0) == []
    assert gate(m, {"faithfulness": 0.70}, max_drop=2.0) == [
        "faithfulness dropped 3.3 points (0.700 -> 0.667)"
    ]


def test_evidence_recall_reads_the_gold_figures_not_the_file_names() -> None:
    from appliance.core.evaluation import evidence_counts

    gold = (
        "Net sales were $82,959 million for the quarter ended June 25, 2022. "
        "(SOURCE: 2022 Q3 AAPL.pdf)\n\nSOURCE(S): 2022 Q3 AAPL.pdf"
    )
    result = {"retrieved": [{"text": "Total net sales (in millions) 82,959 June 25, 2022"}]}
    assert evidence_counts(gold, result, 5) == (2, 2)
    assert evidence_counts(gold, {"retrieved": [{"text": "nothing"}]}, 5) == (0, 2)
