"""Helpers shared by the benchmark scripts: the shared corpus, data folders, timing, reports.

The scripts import this module as ``_common`` (they run as ``python benchmarks/NAME.py``, which
puts this folder first on ``sys.path``; the smoke tests prepend it the same way). Nothing here
imports the appliance's heavy dependencies.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVAL = Path(__file__).resolve().parents[2] / "shared" / "eval"
"""The shared evaluation corpus beside the repository, read in place and never copied."""
SEC10Q = EVAL / "sec10q"
SEC10Q_DOCS = SEC10Q / "docs"
REGULATED = EVAL / "regulated"


class CorpusMissing(Exception):
    """The shared corpus (or the part of it a benchmark needs) is absent."""


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise CorpusMissing(
            f"{what} is absent: expected the folder {path} (the shared evaluation corpus lives "
            "beside the repository, in ../shared/eval)"
        )
    return path


def corpus_pdfs(corpus: str) -> list[Path]:
    """The PDFs of ``sec10q`` (the 12 filings) or ``all`` (those plus the regulated PDFs)."""
    files = sorted(require_dir(SEC10Q_DOCS, "the SEC 10-Q corpus").glob("*.pdf"))
    if corpus == "all":
        files += sorted(require_dir(REGULATED, "the regulated corpus").glob("*/*.pdf"))
    if not files:
        raise CorpusMissing(f"no PDF found under {EVAL}")
    return files


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def quiet_libraries() -> None:
    """No progress bars from tqdm/transformers in a benchmark's report."""
    os.environ.setdefault("TQDM_DISABLE", "1")


@contextmanager
def data_folder(given: Path | None, prefix: str) -> Iterator[Path]:
    """``given`` (created if needed, kept afterwards) or a temporary folder removed on exit."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


# --- timing ----------------------------------------------------------------------------------


@dataclass
class Stage:
    """Seconds and calls spent in one stage, per thread ("main" or the thread's name)."""

    name: str
    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, seconds: float) -> None:
        thread = threading.current_thread()
        key = "main" if thread is threading.main_thread() else thread.name
        with self._lock:
            self.seconds[key] = self.seconds.get(key, 0.0) + seconds
            self.calls[key] = self.calls.get(key, 0) + 1

    def total(self, thread: str | None = None) -> float:
        if thread is None:
            return sum(self.seconds.values())
        return self.seconds.get(thread, 0.0)


class Timed:
    """A transparent proxy that adds the time of every method call to a ``Stage``.

    Used only at the pipeline's seams (the objects the ``Indexer`` is built from): attributes
    that are not callable pass through untouched, so the wrapped object behaves the same.
    """

    def __init__(self, target: Any, stage: Stage, *, only: Sequence[str] | None = None) -> None:
        self._target = target
        self._stage = stage
        self._only = frozenset(only) if only is not None else None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr) or (self._only is not None and name not in self._only):
            return attr
        stage = self._stage

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                stage.add(time.perf_counter() - start)

        return timed


def timed_call(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


# --- statistics and output -------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation, of values sorted ascending."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50, p95, mean and max in milliseconds, and the number of samples."""
    values = sorted(seconds)
    return {
        "n": len(values),
        "p50_ms": round(1000 * percentile(values, 50), 3),
        "p95_ms": round(1000 * percentile(values, 95), 3),
        "mean_ms": round(1000 * sum(values) / len(values), 3),
        "max_ms": round(1000 * values[-1], 3),
    }


def ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator > 0 else None


def print_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=None, sort_keys=False) + "\n")


def machine() -> dict[str, Any]:
    """What the figures were measured on, and how busy it is now (other processes' load skews
    absolute figures; the ratios are measured close together in time to resist it)."""
    import platform

    return {
        "cpus": os.cpu_count(),
        "load_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def load_note(at_start: dict[str, Any]) -> str:
    """A line on how busy the machine was when the benchmark started."""
    load, cpus = at_start["load_1m"], at_start["cpus"] or 1
    text = f"load average {load:.1f} on {cpus} CPUs at the start"
    if load > 0.5 * cpus:
        text += ": other processes were competing for the CPU, absolute figures are pessimistic"
    return text
