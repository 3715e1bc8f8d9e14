"""``benchmarks/evidence_first.py``: its options parse, and its timing of a question asked
while the model is busy works on a small real answerer (the full run needs the shared corpus
and minutes; its figures are the script's to report)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest

from tests.appliance.test_turnstile import answerer  # noqa: F401 (the small real answerer)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("evidence_first")


def test_options_parse(bench: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        bench.main(["--help"])
    assert done.value.code == 0
    assert "--hold" in capsys.readouterr().out


def test_a_busy_model_delays_the_answer_not_the_evidence(bench: Any, answerer: Any) -> None:  # noqa: F811
    free = bench.timed_events(answerer, "When does the office open on weekdays?")
    busy = bench.busy_events(
        answerer,
        "When does the office open on weekdays?",
        "How many days of paid annual leave does an employee get?",
        1.0,
    )
    assert "queue" not in free
    assert free["sources"] < free["token"]
    assert busy["sources"] < busy["queue"] < busy["token"]
    assert busy["token"] >= 1.0  # the answer waited for the other one; the evidence did not
