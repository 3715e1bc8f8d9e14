"""A few staff at once against the real core service (``appliance serve`` in a child process):
each signs in and streams answers in a loop; no request fails and the service stays up.

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
