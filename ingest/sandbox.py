"""Run the parsers in a separate, resource-limited process.

A hostile or broken file (a zip bomb, a PDF with a reference loop, a gigantic page) can make a
parser allocate without bound, hang, or crash the interpreter. :class:`ParserSandbox` keeps one
persistent worker process (``python -m ingest.sandbox``) under an address-space limit, sends it
one path at a time and waits for the answer with a deadline. A worker that runs late is killed
(SIGKILL) and a fresh one is started on the next call; so is one that dies.

The protocol is one JSON object per line, UTF-8, strictly request then reply::

    worker -> parent   {"ready": true}                      once, after start-up
    parent -> worker   {"path": "/docs/a.pdf"}
    worker -> parent   {"progress": [pages done, pages]}     any number, while OCR reads pages
    worker -> parent   {"ok": true, "doc": {"sections": [{"text", "page", "heading",
                                                          "ocr_confidence", "header"}, ...],
                                            "title": ..., "pages": ...}}
                       {"ok": false, "reason": "encrypted PDF (password required)"}

The wall-clock limit holds per page while a scan is OCR'd: each progress line gives the worker
``timeout_s`` more, so a long scan is not cut off while one stuck page still is (and
``ocr.max_pages`` bounds the whole). :meth:`ParserSandbox.progress` says how far the file in
hand is, for ``appliance status``.

The worker imports only :mod:`ingest.parsers` and its format libraries (never torch or the
service's modules), points file descriptor 1 at stderr so a library's stray prints cannot
corrupt the protocol, and ignores SIGINT (the parent owns its lifetime: the worker exits when
its stdin closes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from appliance.core.errors import IngestError, ParseError
from appliance.core.protocols import ParsedDocument, Section
from ingest import parsers
from ingest.confine import confine
from ingest.ocr import OcrOptions
from ingest.parsers import DEFAULT_OPTIONS, ParseOptions
from ingest.safe_open import Staging

START_TIMEOUT_S = 30.0
"""How long a new worker may take to import its libraries and say it is ready."""

_READ_CHUNK = 1 << 20


def parse_in_process(path: Path, options: ParseOptions = DEFAULT_OPTIONS) -> ParsedDocument:
    """Parse ``path`` in this process, without limits (tests and debugging)."""
    return parsers.parse_file(Path(path), options)


class _Timeout(Exception):
    pass


class ParserSandbox:
    """Parses files in one persistent worker process with a wall-clock and a memory limit.

    ``memory_mb`` bounds the worker's whole address space (the interpreter and the format
    libraries take about 60 MB of it). Texts longer than ``max_text_chars`` are rejected in
    the worker. Parse failures raise ParseError with a short reason; a worker that cannot
    start raises IngestError (the file is not to blame). Calls are serialised by a lock.
    """

    def __init__(
        self,
        timeout_s: float,
        memory_mb: int,
        max_text_chars: int,
        *,
        log_path: Path | None = None,
        confined: bool = True,
        options: ParseOptions = DEFAULT_OPTIONS,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if memory_mb <= 0:
            raise ValueError(f"memory_mb must be positive, got {memory_mb}")
        if max_text_chars <= 0:
            raise ValueError(f"max_text_chars must be positive, got {max_text_chars}")
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.max_text_chars = max_text_chars
        self._log_path = log_path
        self.options = options
        self._progress: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._selector: selectors.BaseSelector | None = None
        self._buffer = bytearray()
        self._closed = False
        self.confined = confined
        self.staging = Staging()
        """The only place the (confined) worker reads documents from: private copies."""
        self._scratch = Path(tempfile.mkdtemp(prefix="appliance-parser-tmp-"))
        self.confinement: dict[str, Any] | None = None
        """What the worker's confinement applied (``ingest.confine``), once it has started."""

    # --- public --------------------------------------------------------------------------

    @property
    def worker_pid(self) -> int | None:
        """The running worker's process id, or None when none is running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def progress(self) -> dict[str, Any] | None:
        """The file being OCR'd and how far: ``{"path", "pages_done", "pages"}``; None when
        no scan is in hand (read without the lock: it is replaced whole, never changed)."""
        return self._progress

    def start(self) -> None:
        """Start the worker now rather than on the first parse."""
        with self._lock:
            self._ensure_worker()

    def parse(self, path: Path) -> ParsedDocument:
        """Parse ``path`` in the worker. Raises ParseError (with the reason) if the file cannot
        be parsed, takes longer than ``timeout_s`` or crashes the worker."""
        path = Path(path)
        parsers.parser_for(path)  # an unknown suffix fails here, without a round trip
        if self._closed:
            raise IngestError("the parser sandbox is closed")
        if not path.resolve().is_relative_to(self.staging.folder.resolve()):
            # The confined worker reads nothing else: a caller's own file goes via a copy.
            with self.staging.holding(path) as staged:
                return self.parse(staged)
        request = json.dumps({"path": os.fspath(path.absolute())}).encode("ascii") + b"\n"
        with self._lock:
            proc = self._ensure_worker()
            deadline = time.monotonic() + self.timeout_s
            try:
                self._send(proc, request)
                while True:
                    line = self._read_line(proc, deadline)
                    done = _progress_of(line)
                    if done is None:
                        break
                    self._progress = {"path": str(path), "pages_done": done[0], "pages": done[1]}
                    deadline = time.monotonic() + self.timeout_s
            except _Timeout:
                self._discard_worker()
                raise ParseError(f"parsing took longer than {self.timeout_s:g}s") from None
            finally:
                self._progress = None
            if line is None:
                raise ParseError(self._crash_reason())
            try:
                reply = json.loads(line)
                ok, body = bool(reply["ok"]), reply["doc"] if reply["ok"] else reply["reason"]
            except (ValueError, KeyError, TypeError) as exc:
                self._discard_worker()
                raise IngestError(f"the parser process sent a malformed reply: {exc}") from None
        if not ok:
            raise ParseError(str(body))
        try:
            return self._document(body)
        except (KeyError, TypeError) as exc:
            raise IngestError(f"the parser process sent a malformed document: {exc}") from None

    def close(self) -> None:
        """Stop the worker (it exits when its stdin closes; killed if it does not)."""
        with self._lock:
            self._closed = True
            proc = self._proc
            if proc is not None:
                if proc.stdin is not None:
                    with contextlib.suppress(OSError):
                        proc.stdin.close()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2)
                self._discard_worker()
        self.staging.close()
        shutil.rmtree(self._scratch, ignore_errors=True)

    def __enter__(self) -> ParserSandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the worker's lifetime -----------------------------------------------------------

    def _ensure_worker(self) -> subprocess.Popen[bytes]:
        if self._closed:
            raise IngestError("the parser sandbox is closed")
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self._discard_worker()  # died while idle: the next file is not to blame
        return self._start_worker()

    def _start_worker(self) -> subprocess.Popen[bytes]:
        # The package root goes first on the path so the worker runs this very code.
        root = str(Path(__file__).resolve().parent.parent)
        # An empty environment: no secrets, proxies or tokens of the service reach a parser.
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
            "TMPDIR": str(self._scratch),
            "LANG": "C.UTF-8",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        command = [
            sys.executable,
            "-m",
            "ingest.sandbox",
            f"--memory-mb={self.memory_mb}",
            f"--max-text-chars={self.max_text_chars}",
            f"--timeout-s={self.timeout_s}",
            f"--options={_options_json(self.options)}",
        ]
        if self.confined:
            command += [f"--read={self.staging.folder}", f"--write={self._scratch}"]
        stderr: IO[bytes] | int = subprocess.DEVNULL
        log = None
        if self._log_path is not None:
            log = stderr = self._log_path.open("ab")
        try:
            # No preexec_fn (unsafe when the service has threads): the worker limits itself
            # before it imports anything big, and start_new_session keeps Ctrl-C away from it.
            proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
                bufsize=0,
                close_fds=True,
                start_new_session=True,
            )
        except OSError as exc:
            raise IngestError(f"cannot start the parser process: {exc}") from None
        finally:
            if log is not None:
                log.close()
        self._proc = proc
        self._buffer.clear()
        assert proc.stdout is not None
        self._selector = selectors.DefaultSelector()
        self._selector.register(proc.stdout.fileno(), selectors.EVENT_READ)
        try:
            line = self._read_line(proc, time.monotonic() + max(START_TIMEOUT_S, self.timeout_s))
        except _Timeout:
            line = None
        if line is None or not _is_ready(line):
            how = self._exit_description()
            self._discard_worker()
            raise IngestError(
                f"the parser process did not start ({how}); "
                f"is the memory limit ({self.memory_mb} MB) too small?"
            )
        self.confinement = json.loads(line).get("confined")
        return proc

    def check(self, read: list[str], connect: list[tuple[str, int]]) -> dict[str, Any]:
        """Ask the worker to try to open each path and connect to each address, from inside
        its confinement (``appliance doctor`` and the tests show what a parser can reach)."""
        request = json.dumps({"check": {"read": read, "connect": connect}}).encode() + b"\n"
        with self._lock:
            proc = self._ensure_worker()
            self._send(proc, request)
            line = self._read_line(proc, time.monotonic() + self.timeout_s)
        if line is None:
            raise IngestError(self._crash_reason())
        result: dict[str, Any] = json.loads(line)["check"]
        result["confined"] = self.confinement
        return result

    def _discard_worker(self) -> None:
        """Kill and reap the worker, if any, and forget it."""
        proc, self._proc = self._proc, None
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        self._buffer.clear()
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def _exit_description(self) -> str:
        proc = self._proc
        if proc is None:
            return "no process"
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "no answer"
        if code < 0:
            return f"signal {-code}"
        return f"exit code {code}"

    def _crash_reason(self) -> str:
        how = self._exit_description()
        self._discard_worker()
        return f"parser process crashed ({how})"

    # --- the pipe ------------------------------------------------------------------------

    def _send(self, proc: subprocess.Popen[bytes], data: bytes) -> None:
        assert proc.stdin is not None
        # If it died, reading gives EOF and the crash is reported from there.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            _write_all(proc.stdin.fileno(), data)

    def _read_line(self, proc: subprocess.Popen[bytes], deadline: float) -> bytes | None:
        """The next reply line (without the newline), or None on EOF. Raises _Timeout."""
        assert proc.stdout is not None
        assert self._selector is not None
        fd = proc.stdout.fileno()
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Timeout
            if not self._selector.select(remaining):
                continue
            chunk = os.read(fd, _READ_CHUNK)
            if not chunk:
                return None
            self._buffer += chunk

    def _document(self, doc: dict[str, Any]) -> ParsedDocument:
        sections = [
            Section(
                text=s["text"],
                page=s.get("page"),
                heading=s.get("heading"),
                ocr_confidence=s.get("ocr_confidence"),
                header=s.get("header"),
            )
            for s in doc["sections"]
        ]
        total = sum(len(s.text) for s in sections)
        if total > self.max_text_chars:
            raise ParseError(too_long_reason(total, self.max_text_chars))
        return ParsedDocument(sections=sections, title=doc.get("title"), pages=doc.get("pages"))


def _progress_of(line: bytes | None) -> tuple[int, int] | None:
    """(pages done, pages) from a progress line; None for any other line."""
    if line is None or not line.startswith(b'{"progress"'):
        return None
    try:
        done, total = json.loads(line)["progress"]
        return int(done), int(total)
    except (ValueError, KeyError, TypeError):
        return None


def _options_json(options: ParseOptions) -> str:
    ocr = options.ocr
    return json.dumps(
        {
            "tables": options.tables,
            "table_style": options.table_style,
            "ocr": {
                "engine": ocr.engine,
                "languages": list(ocr.languages),
                "dpi": ocr.dpi,
                "min_text_chars": ocr.min_text_chars,
                "max_pages": ocr.max_pages,
            },
        }
    )


def _options_from_json(text: str, progress: parsers.ProgressFn) -> ParseOptions:
    data = json.loads(text)
    ocr = dict(data["ocr"])
    ocr["languages"] = tuple(ocr["languages"])
    return ParseOptions(
        ocr=OcrOptions(**ocr),
        tables=bool(data["tables"]),
        table_style=data["table_style"],
        progress=progress,
    )


def _is_ready(line: bytes) -> bool:
    try:
        return json.loads(line).get("ready") is True
    except (ValueError, AttributeError):
        return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def too_long_reason(chars: int, limit: int) -> str:
    return f"extracted text too long ({chars} chars > {limit})"


# --- the worker ------------------------------------------------------------------------------


def _limit_resources(memory_mb: int) -> None:
    limit = memory_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _check(request: dict[str, Any]) -> dict[str, Any]:
    """What this process can reach: each path opened for reading, each address connected."""
    import socket

    out: dict[str, Any] = {"read": {}, "connect": {}}
    for path in request.get("read", []):
        try:
            with open(path, "rb") as fh:
                fh.read(1)
            out["read"][path] = "allowed"
        except OSError as exc:
            out["read"][path] = f"denied: {exc.strerror}"
    for host, port in request.get("connect", []):
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                out["connect"][f"{host}:{port}"] = "allowed"
        except OSError as exc:
            out["connect"][f"{host}:{port}"] = f"denied: {exc.strerror or exc}"
    return {"ok": True, "check": out}


def _handle(
    line: bytes, memory_mb: int, max_text_chars: int, options: ParseOptions = DEFAULT_OPTIONS
) -> dict[str, Any]:
    try:
        request = json.loads(line)
        if "check" in request:
            return _check(request["check"])
        path = Path(request["path"])
    except (ValueError, KeyError, TypeError) as exc:
        return {"ok": False, "reason": f"bad request to the parser process: {exc}"}
    try:
        doc = parsers.parse_file(path, options)
        total = sum(len(s.text) for s in doc.sections)
        if total > max_text_chars:
            return {"ok": False, "reason": too_long_reason(total, max_text_chars)}
        return {
            "ok": True,
            "doc": {
                "sections": [
                    {
                        "text": s.text,
                        "page": s.page,
                        "heading": s.heading,
                        "ocr_confidence": s.ocr_confidence,
                        "header": s.header,
                    }
                    for s in doc.sections
                ],
                "title": doc.title,
                "pages": doc.pages,
            },
        }
    except ParseError as exc:
        return {"ok": False, "reason": exc.reason}
    except MemoryError:
        return {"ok": False, "reason": _memory_reason(memory_mb)}
    except Exception as exc:
        message = " ".join(str(exc).split())
        if len(message) > 160:
            message = message[:159] + "…"
        return {"ok": False, "reason": f"parser failed: {type(exc).__name__}: {message}"}


def _memory_reason(memory_mb: int) -> str:
    return f"needs more than {memory_mb} MB of memory to parse"


def _encode(reply: dict[str, Any], memory_mb: int) -> bytes:
    try:
        return json.dumps(reply, ensure_ascii=False).encode("utf-8") + b"\n"
    except MemoryError:
        reply = {"ok": False, "reason": _memory_reason(memory_mb)}
        return json.dumps(reply).encode("utf-8") + b"\n"


def worker_main(argv: list[str] | None = None) -> int:
    """The worker loop: a request line in, a reply line out, until stdin closes."""
    ap = argparse.ArgumentParser(prog="python -m ingest.sandbox", description=__doc__)
    ap.add_argument("--memory-mb", type=int, required=True)
    ap.add_argument("--max-text-chars", type=int, required=True)
    ap.add_argument("--timeout-s", type=float, required=True)
    ap.add_argument("--read", action="append", default=[], help="confine: also readable")
    ap.add_argument("--write", action="append", default=[], help="confine: also writable")
    ap.add_argument("--options", default=None, help="ParseOptions as JSON (OCR, tables)")
    args = ap.parse_args(argv)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _limit_resources(args.memory_mb)
    replies = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    parsers.preload_libraries()
    confined = None
    if args.read or args.write:  # the libraries are loaded: from here on, nothing else
        confined = confine(read=[Path(p) for p in args.read], write=[Path(p) for p in args.write])
    # A backstop for an orphan: the parent kills a late worker long before this alarm.
    alarm_s = math.ceil(args.timeout_s) * 2 + 10

    def progress(done: int, total: int) -> None:
        signal.alarm(alarm_s)  # the parent, too, allows each page its own time
        _write_all(replies, json.dumps({"progress": [done, total]}).encode("ascii") + b"\n")

    options = (
        _options_from_json(args.options, progress)
        if args.options
        else ParseOptions(progress=progress)
    )
    try:
        _write_all(replies, json.dumps({"ready": True, "confined": confined}).encode() + b"\n")
        for line in sys.stdin.buffer:
            signal.alarm(alarm_s)
            handled = _handle(line, args.memory_mb, args.max_text_chars, options)
            reply = _encode(handled, args.memory_mb)
            signal.alarm(0)
            _write_all(replies, reply)
    except BrokenPipeError:
        return 0  # the parent went away
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
