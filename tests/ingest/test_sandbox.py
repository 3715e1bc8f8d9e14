"""The parser sandbox: a real worker process, real limits, real hostile files."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.core.errors import IngestError, ParseError
from ingest.sandbox import ParserSandbox, parse_in_process
from tests.ingest.fixtures import make_docx, make_html, make_large_text, make_pdf, make_zip_bomb

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def sandbox() -> Iterator[ParserSandbox]:
    with ParserSandbox(timeout_s=20, memory_mb=1024, max_text_chars=1_000_000) as box:
        yield box


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def block_in_worker(fifo: Path, timeout_s: float = 5.0) -> int:
    """Wait until a worker has opened ``fifo`` for reading (it is then stuck in the parser),
    and return a write end that keeps it stuck until closed."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_parse_matches_in_process(sandbox: ParserSandbox, tmp_path: Path) -> None:
    for path in (
        make_pdf(tmp_path / "a.pdf", outline=True),
        make_docx(tmp_path / "b.docx"),
        make_html(tmp_path / "c.html"),
    ):
        assert sandbox.parse(path) == parse_in_process(path)


def test_parse_reasons_come_back(sandbox: ParserSandbox, tmp_path: Path) -> None:
    locked = make_pdf(tmp_path / "locked.pdf", encrypt="secret")
    with pytest.raises(ParseError, match=r"^encrypted PDF \(password required\)$"):
        sandbox.parse(locked)
    bomb = make_zip_bomb(tmp_path / "bomb.docx", member_mb=20)
    with pytest.raises(ParseError, match=r"^DOCX zip bomb: "):
        sandbox.parse(bomb)
    # An error is an answer, not a crash: the worker stays.
    pid = sandbox.worker_pid
    assert pid is not None
    assert sandbox.parse(make_pdf(tmp_path / "ok.pdf")).pages == 3
    assert sandbox.worker_pid == pid


def test_odd_file_names_travel_intact(sandbox: ParserSandbox, tmp_path: Path) -> None:
    for name in ("new\nline.pdf", "caf\u00e9 \u2603 r\u00e9sum\u00e9.pdf", " spaces .pdf"):
        assert sandbox.parse(make_pdf(tmp_path / name)).pages == 3


def test_unknown_suffix_fails_without_a_worker(sandbox: ParserSandbox) -> None:
    with pytest.raises(ParseError, match=r"no parser for files ending in '\.exe'"):
        sandbox.parse(Path("setup.exe"))
    assert sandbox.worker_pid is None


def test_worker_is_persistent_and_cheap(sandbox: ParserSandbox, tmp_path: Path) -> None:
    path = tmp_path / "small.txt"
    path.write_text("A small note.\n")
    sandbox.parse(path)
    pid = sandbox.worker_pid
    start = time.perf_counter()
    for _ in range(20):
        sandbox.parse(path)
    per_parse = (time.perf_counter() - start) / 20
    assert sandbox.worker_pid == pid
    assert per_parse < 0.05, f"{per_parse * 1000:.1f} ms per parse"


def test_timeout_kills_the_worker_and_the_next_parse_works(tmp_path: Path) -> None:
    ok = tmp_path / "ok.txt"
    ok.write_text("fine\n")
    with ParserSandbox(timeout_s=0.5, memory_mb=1024, max_text_chars=10_000) as sandbox:
        # Placed where the worker reads (ingestion never stages a FIFO): opening it for reading
        # blocks until a writer comes, a parser that hangs.
        fifo = sandbox.staging.folder / "never-ends.txt"
        os.mkfifo(fifo)
        sandbox.start()
        pid = sandbox.worker_pid
        assert pid is not None
        started = time.monotonic()
        with pytest.raises(ParseError, match=r"^parsing took longer than 0\.5s$"):
            sandbox.parse(fifo)
        assert time.monotonic() - started < 3
        assert sandbox.worker_pid is None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # killed and reaped
        assert sandbox.parse(ok).sections[0].text == "fine"
        assert sandbox.worker_pid not in (None, pid)


def test_memory_limit_gives_a_clear_reason(tmp_path: Path) -> None:
    big = make_large_text(tmp_path / "big.txt", mb=120)
    ok = tmp_path / "ok.txt"
    ok.write_text("fine\n")
    with ParserSandbox(timeout_s=20, memory_mb=150, max_text_chars=10**9) as sandbox:
        with pytest.raises(ParseError, match=r"^needs more than 150 MB of memory to parse$"):
            sandbox.parse(big)
        assert sandbox.parse(ok).sections[0].text == "fine"


def test_text_limit_is_enforced(tmp_path: Path) -> None:
    path = tmp_path / "long.txt"
    path.write_text("word " * 1000)
    with (
        ParserSandbox(timeout_s=20, memory_mb=1024, max_text_chars=1000) as sandbox,
        pytest.raises(ParseError, match=r"^extracted text too long \(4999 chars > 1000\)$"),
    ):
        sandbox.parse(path)


def test_worker_crash_mid_parse_is_reported_and_recovered(
    sandbox: ParserSandbox, tmp_path: Path
) -> None:
    fifo = sandbox.staging.folder / "stuck.txt"  # where the worker reads: see above
    os.mkfifo(fifo)
    ok = tmp_path / "ok.txt"
    ok.write_text("fine\n")
    sandbox.start()
    pid = sandbox.worker_pid
    assert pid is not None
    errors: list[BaseException] = []

    def parse_stuck() -> None:
        try:
            sandbox.parse(fifo)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=parse_stuck)
    thread.start()
    writer = block_in_worker(fifo)
    try:
        os.kill(pid, signal.SIGKILL)
        thread.join(timeout=10)
    finally:
        os.close(writer)
    assert not thread.is_alive()
    assert len(errors) == 1
    assert isinstance(errors[0], ParseError)
    assert errors[0].reason == "parser process crashed (signal 9)"
    assert sandbox.parse(ok).sections[0].text == "fine"
    assert sandbox.worker_pid not in (None, pid)


def test_worker_dying_while_idle_is_replaced_quietly(
    sandbox: ParserSandbox, tmp_path: Path
) -> None:
    ok = tmp_path / "ok.txt"
    ok.write_text("fine\n")
    sandbox.parse(ok)
    pid = sandbox.worker_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: sandbox.worker_pid is None)
    assert sandbox.parse(ok).sections[0].text == "fine"
    assert sandbox.worker_pid not in (None, pid)


def test_concurrent_callers_are_serialised(sandbox: ParserSandbox, tmp_path: Path) -> None:
    paths = []
    for i in range(8):
        path = tmp_path / f"note{i}.txt"
        path.write_text(f"note number {i}\n")
        paths.append(path)
    results: dict[int, str] = {}

    def parse(i: int) -> None:
        results[i] = sandbox.parse(paths[i]).sections[0].text

    threads = [threading.Thread(target=parse, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert results == {i: f"note number {i}" for i in range(8)}


def test_a_worker_that_cannot_start_is_not_the_files_fault(tmp_path: Path) -> None:
    ok = tmp_path / "ok.txt"
    ok.write_text("fine\n")
    with (
        ParserSandbox(timeout_s=20, memory_mb=16, max_text_chars=1000) as sandbox,
        pytest.raises(IngestError, match=r"did not start .* memory limit \(16 MB\) too small"),
    ):
        sandbox.parse(ok)


def test_close_stops_the_worker(tmp_path: Path) -> None:
    ok = tmp_path / "ok.txt"
    ok.write_text("fine\n")
    sandbox = ParserSandbox(timeout_s=20, memory_mb=1024, max_text_chars=1000)
    sandbox.parse(ok)
    pid = sandbox.worker_pid
    assert pid is not None
    sandbox.close()
    assert sandbox.worker_pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(IngestError, match="closed"):
        sandbox.parse(ok)


def test_worker_imports_no_heavy_modules() -> None:
    code = (
        "import sys\n"
        "from ingest import parsers, sandbox\n"
        "parsers.preload_libraries()\n"
        "heavy = {'torch', 'transformers', 'sentence_transformers', 'qdrant_client',"
        " 'qdrant_edge', 'numpy', 'appliance.core.settings', 'ingest.pipeline'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        ParserSandbox(timeout_s=0, memory_mb=1024, max_text_chars=10)


@pytest.mark.slow
def test_sec10q_pdfs(sec10q_docs: Path) -> None:
    pdfs = sorted(sec10q_docs.glob("*.pdf"))
    assert len(pdfs) == 12
    with ParserSandbox(timeout_s=60, memory_mb=2048, max_text_chars=20_000_000) as sandbox:
        for pdf in pdfs:
            doc = sandbox.parse(pdf)
            assert doc.pages is not None
            assert doc.pages > 0, pdf.name
            assert len(doc.sections) >= doc.pages - 2, pdf.name
            text = "\n".join(s.text for s in doc.sections)
            assert len(text) > 10_000, pdf.name
            assert "\x02" not in text
            assert "\r" not in text
            assert "FORM 10-Q" in text.upper()
            assert doc.title is None or "Form 10-Q" in doc.title
