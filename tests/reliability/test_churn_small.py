"""Random creates, edits, renames, moves between subfolders and deletes under the running
watcher, with the real pipeline: once the watcher is idle the index equals the folder.

The full-size run is ``benchmarks/reliability_churn.py`` (2,000 operations)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability import run_script


@pytest.mark.slow
def test_churn_under_the_watcher_converges_to_an_exact_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Bursts of at most 5 operations, each followed by a pause longer than the debounce, so
    # every burst is its own batch and none trips the mass-deletion guard (bigger bursts on a
    # folder this small would, by design: renames and moves count as deletions there).
    argv = ["--ops", "150", "--initial", "40", "--seed", "11", "--max-burst", "5"]
    argv += ["--min-pause", "0.5", "--max-pause", "0.9", "--debounce", "0.3", "--timeout", "120"]
    argv += ["--data-dir", str(tmp_path / "churn")]
    result = run_script("reliability_churn", argv, monkeypatch, capsys)

    assert sum(result["by_kind"].values()) == 150
    assert {"create", "modify", "rename", "move", "delete"} <= result["by_kind"].keys()
    assert result["converged"]
    assert (result["missing"], result["duplicate"], result["stale"]) == (0, 0, 0)
    assert result["problems"] == []
    assert result["failed_files"] == 0
    assert result["documents"] == result["folder_files"] > 0
    assert result["chunks"] == result["store_points"]
    assert result["watcher_state"] == "ok"
    assert result["guard_holds_confirmed"] == []
    assert result["exact"]
