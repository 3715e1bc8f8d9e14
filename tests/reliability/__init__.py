"""Small, CI-sized runs of the reliability benchmarks (kill -9, churn, injection, load).

The scripts live in ``benchmarks/`` (not a package) and import their helpers as ``_common``
and ``_reliability``, so the folder goes first on ``sys.path``, as ``python benchmarks/NAME.py``
does; ``run_script`` calls a script's ``main()`` with ``--json`` and returns its figures.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run_script(
    name: str,
    argv: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *,
    expect_exit: int = 0,
) -> Any:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(name)
    code = module.main([*argv, "--json"])
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    # the figures go to the test log: they are what these runs are for
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1)[:4000])
    assert code == expect_exit, result
    return result
