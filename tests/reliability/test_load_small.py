"""A few staff at once against the real core service (``appliance serve`` in a child process):
each signs in and streams answers in a loop; no request fails and the service stays up. Then
two engines side by side with a queue limit of one: ``appliance ask`` commands one by one and
at once, 503s (never errors) beyond the limit, the evidence before the first token.

The full-size run is ``benchmarks/load_test.py`` (20 users, 300 s, the SEC filings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability import run_script


@pytest.mark.slow
@pytest.mark.integration
def test_three_users_for_twenty_seconds_without_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--generated", "12", "--users", "3", "--duration", "20", "--sample-every", "2"]
    argv += ["--engines", "1", "--asks", "0"]
    result = run_script(
        "load_test", [*argv, "--data-dir", str(tmp_path / "load")], monkeypatch, capsys
    )

    assert result["errors"] == 0, result["error_examples"]
    assert result["logins"] == 3
    assert result["requests_completed"] >= 3
    assert result["documents"] == 12
    ttft, total = result["ttft"], result["total"]
    assert 0 < ttft["p50_ms"] <= total["p50_ms"]
    assert ttft["p95_ms"] <= total["max_ms"]
    assert result["rss_mb"]["peak"] >= result["rss_mb"]["start"] > 0
    assert result["service_alive_after"]


@pytest.mark.slow
@pytest.mark.integration
def test_two_engines_side_by_side_with_a_full_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--generated", "8", "--users", "4", "--duration", "20", "--sample-every", "2"]
    argv += ["--engines", "1,2", "--asks", "2", "--queue-limit", "1"]
    result = run_script(
        "load_test", [*argv, "--data-dir", str(tmp_path / "load")], monkeypatch, capsys
    )

    assert [e["parallel"] for e in result["engines"]] == [1, 2]
    assert result["parallel"] == 1  # the top level is the baseline's figures
    for engine in result["engines"]:
        assert engine["errors"] == 0, engine["error_examples"]
        assert engine["resets"] == 0
        assert engine["logins"] == 4
        assert engine["asks"]["failures"] == []
        assert engine["asks"]["ratio"] > 0
        assert engine["first_evidence"]["p50_ms"] <= engine["ttft"]["p50_ms"]
        assert engine["service_alive_after"]
    # four users, one slot and room for one to wait: the others are told to come back
    assert result["engines"][0]["busy_503"] >= 1
    (comparison,) = result["comparison"]
    assert comparison["parallel"] == 2
    assert comparison["against_parallel"] == 1
