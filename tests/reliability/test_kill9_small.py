"""kill -9 during the real ingestion (MiniLM, Qdrant Edge, SQLite, the parser sandbox), a few
times: after a final ``appliance ingest`` the index equals the folder exactly.

The full-size run is ``benchmarks/reliability_kill9.py`` (1,000 files, 20 rounds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability import run_script


@pytest.mark.slow
@pytest.mark.integration
def test_kill_9_during_real_ingestion_leaves_an_exact_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--files", "60", "--rounds", "3", "--seed", "3", "--max-delay", "1.0"]
    result = run_script(
        "reliability_kill9", [*argv, "--data-dir", str(tmp_path / "k9")], monkeypatch, capsys
    )
    # the first run has 60 files to embed and is killed within a second of its start-up
    assert result["killed"] >= 1
    assert result["final_ingest"]["failed"] == 0
    assert (result["missing"], result["duplicate"], result["stale"]) == (0, 0, 0)
    assert result["problems"] == []
    assert result["failed_files"] == 0
    assert result["documents"] == result["folder_files"] > 0
    assert result["chunks"] == result["store_points"] >= result["documents"]
    assert result["second_ingest"] == {"added": 0, "updated": 0, "removed": 0, "failed": 0}
    assert result["exact"]
