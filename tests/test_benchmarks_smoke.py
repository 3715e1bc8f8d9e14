"""Smoke tests of the benchmark scripts: each ``main()`` runs end to end at tiny sizes.

The scripts live in ``benchmarks/`` (not a package) and import their helpers as ``_common``,
so the folder is put first on ``sys.path``, as running ``python benchmarks/NAME.py`` does.
Figures are not asserted: they are the scripts' to report, these tests prove the scripts work.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SEC10Q = Path(__file__).resolve().parents[2] / "shared" / "eval" / "sec10q"


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], ModuleType]:
    """Imports a benchmark script (or ``_common``) by name."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def load(name: str) -> ModuleType:
        return importlib.import_module(name)

    return load


@pytest.fixture
def corpus() -> Path:
    if not (SEC10Q / "docs").is_dir():
        pytest.skip(f"the shared corpus is absent ({SEC10Q}); it lives beside the project")
    return SEC10Q


def run_json(module: ModuleType, argv: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    assert module.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_ingest_throughput_on_two_filings(
    script: Any, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = script("ingest_throughput")
    argv = ["--match", "Q3 AAPL", "--limit", "2", "--probe-texts", "4"]
    result = run_json(bench, [*argv, "--data-dir", str(tmp_path / "bench")], capsys)

    (one,) = result["rounds"]
    assert result["documents"] == 2
    assert one["files"] == 2
    assert one["chunks"] == one["store_points"] > 0
    assert 0 < one["embedded_texts"] <= one["chunks"]
    assert result["ratio"] == one["ratio"] > 0
    assert result["cpu_ratio"] == one["cpu_ratio"] > 0
    assert len(one["probe_chunks_per_s"]) == 3
    stages = one["breakdown_s"]
    assert {"embed", "store", "bm25"} <= stages["main_thread"].keys()
    assert {"parse", "chunk"} <= stages["parse_thread"].keys()
    tables = result["table_parse"]
    assert tables["with_tables"] >= 1  # the Q3 AAPL filings: their statements are tables
    assert tables["all_ratio"] > 0


@pytest.mark.slow
def test_search_latency_at_tiny_size(
    script: Any, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = script("search_latency")
    argv = ["--points", "2000", "--server-points", "500", "--queries", "20"]
    result = run_json(bench, argv, capsys)

    stores = {(row["store"], row["points"]): row for row in result["stores"]}
    assert ("qdrant-edge", 2000) in stores
    assert ("qdrant-edge", 500) in stores
    assert ("qdrant-client local (:memory:)", 500) in stores
    for row in stores.values():
        for mode in ("hybrid", "dense"):
            latency = row["latency"][mode]
            assert latency["n"] == 20
            assert 0 < latency["p50_ms"] <= latency["p95_ms"] <= latency["max_ms"]
    assert result["server_capped"]
    assert {c["mode"] for c in result["ratios"]} == {"hybrid", "dense"}
    assert all(c["p50_ratio"] > 0 for c in result["ratios"])
    assert {g["mode"] for g in result["edge_optimize_gain"]} == {"hybrid", "dense"}


@pytest.mark.slow
def test_search_latency_with_synthetic_texts_and_a_report(
    script: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs without the shared corpus; the readable report names both stores."""
    bench = script("search_latency")
    argv = ["--points", "1000", "--server-points", "200", "--queries", "5"]
    assert bench.main([*argv, "--texts", "synthetic"]) == 0
    out = capsys.readouterr().out
    assert "qdrant-edge" in out
    assert "qdrant-client local" in out
    assert "latency ratio" in out


@pytest.mark.parametrize("name", ["ingest_throughput", "search_latency"])
def test_a_missing_corpus_is_a_clear_error(
    script: Any,
    name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    common = script("_common")
    bench = script(name)
    monkeypatch.setattr(common, "SEC10Q_DOCS", tmp_path / "absent" / "docs")
    monkeypatch.setattr(common, "SEC10Q", tmp_path / "absent")
    monkeypatch.setattr(bench, "SEC10Q", tmp_path / "absent", raising=False)
    assert bench.main(["--points", "10"] if name == "search_latency" else []) == 2
    err = capsys.readouterr().err
    assert "absent" in err
    assert str(tmp_path / "absent") in err


@pytest.mark.parametrize(
    "name",
    [
        "finetune_throughput",
        "finetune_end_to_end",
        "gguf_quantization",
        "reliability_kill9",
        "reliability_churn",
        "prompt_injection",
        "load_test",
        "answer_quality",
        "claim_calibration",
    ],
)
def test_the_issue_5_and_6_scripts_import_and_parse_their_options(
    script: Any, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """They run at full size in minutes to hours; their small versions run in tests/finetune,
    tests/reliability and tests/ops. Here: they import without heavy side effects and their
    options parse."""
    bench = script(name)
    with pytest.raises(SystemExit) as done:
        bench.main(["--help"])
    assert done.value.code == 0
    assert "--json" in capsys.readouterr().out


@pytest.mark.slow
def test_security_probe_at_small_size(
    script: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = script("security_probe")
    assert bench.main(["--idle", "50", "--data-dir", str(tmp_path / "probe"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["idle_connections"]["open"] == 50
    assert result["aborted_streams"]["question_records"] == 20
    assert all(result["verdicts"].values()), result["verdicts"]


def test_ocr_quality_reads_the_generated_page(
    script: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    if shutil.which("tesseract") is None:
        pytest.skip("Tesseract is not installed (install.sh --system)")
    bench = script("ocr_quality")
    result = run_json(bench, ["--pages", "1"], capsys)
    assert result["char_accuracy"] >= 0.95
    assert result["ocr_s_per_page"]["best"] > 0
    assert result["ratio_ocr_to_text_layer"] > 1


def test_evidence_is_the_gold_figures_found_in_the_passages(script: Any) -> None:
    bench = script("retrieval_quality")
    answer = "Total net sales were $81,797 million in the quarter."
    row = "Total net sales | Three Months Ended July 1, 2023: 81,797 (in millions)"
    assert bench.figures_found(answer, [row]) == (1, 1)
    assert bench.figures_found(answer, ["Total net sales 82,959 rose"]) == (0, 1)
    questions = [bench.Question("q", "?", frozenset({"a.pdf"}), answer)]
    scores = bench.score("hybrid", [["a.pdf"]], questions, [[row]])
    assert (scores.evidence_recall, scores.figure_recall, scores.questions_with_figures) == (
        1.0,
        1.0,
        1,
    )
    assert scores.evidence_by_source is None  # the golden set names no source
    drawn = [bench.Question("q", "?", frozenset({"a.pdf"}), answer, "Table")] * 2
    by_source = bench.score("hybrid", [["a.pdf"]] * 2, drawn, [[row], ["nothing"]])
    assert by_source.evidence_by_source == {
        "Table": {"questions": 2, "evidence_recall": 0.5, "figure_recall": 0.5}
    }


@pytest.mark.slow
def test_batching_throughput_at_tiny_size(script: Any, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_json(script("batching_throughput"), ["--tokens", "2", "--threads", "1"], capsys)
    assert [row["streams"] for row in result["batched"]] == [1, 2, 4, 8]
    assert all(row["tokens"] > 0 for row in result["batched"])
    assert result["aggregate_8_over_1"] > 0
    assert result["kv_cache"]["kv_mib_per_slot"] > 0
    reuse = result["prefix_reuse"]
    assert 0 < reuse["reused_prompt_tokens"] < reuse["prompt_tokens"]
    host = result["host_prefix_cache"]
    assert host["on"]["restored_prefixes"] > 0
    assert host["off"]["restored_prefixes"] == 0
    assert host["on"]["prefilled_prompt_tokens"] < host["off"]["prefilled_prompt_tokens"]
