"""Hostile files in the documents folder, all at once, through the real indexer.

One folder holds good documents of every format next to corrupt, truncated and encrypted PDFs,
DOCX zip bombs (one honest, one with lying headers), 2 GB sparse files, random bytes and an ELF
under document suffixes, odd names (newlines, NFC/NFD, right-to-left override, emoji, leading
dashes, ``..``, invalid UTF-8) and symlinks that leave the folder or loop. The index is built
by the real pipeline (parser sandbox, SQLite state, Qdrant Edge; the hashing embedder), and
every case must end as "indexed" or as a failure with a clear reason in ``status()``, while:

* nothing outside the folder is read: no path the pipeline hashes or hands to the parser, and
  no file the service process or the parser process opens (audit hooks on "open" in both), lies
  outside it, and a canary string planted outside appears neither in search results nor in any
  byte of the data folder (with the good documents' words as the positive control);
* every good document stays intact and searchable.

Run ``pytest tests/security/test_hostile_files.py -s`` to see the case -> outcome -> reason
table (docs/security-figures.md holds a copy). Every fixture is generated here; nothing binary
is checked in.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.core.protocols import ParsedDocument
from ingest.pipeline import Indexer
from ingest.retrieval import search
from tests.ingest.fixtures import make_docx, make_html, make_pdf

pytestmark = pytest.mark.integration

CANARY = "zqxcanary7731"  # only ever written outside the documents folder
GIB = 1 << 30

# Files that must be indexed and found by their own word: relative path -> (word, content).
GOOD_TEXT = {
    "policy.md": ("alphapolicy", "# Policy\n\nThe alphapolicy retention rule applies.\n"),
    "notes.txt": ("bravonotes", "Notes\n\nThe bravonotes meeting is on Monday.\n"),
    "sub/deep.md": ("charliedeep", "# Deep\n\nThe charliedeep folder file.\n"),
}


# --- generators --------------------------------------------------------------------------------


def _zip(path: Path, members: list[tuple[str, bytes, int, int, int]]) -> Path:
    """A zip written by hand from ``(name, raw data, method, crc, declared size)`` so a member's
    declared size can lie and a deflate stream can be spliced in without ever inflating it."""
    local, central = bytearray(), bytearray()
    for name, data, method, crc, size in members:
        encoded = name.encode()
        offset = len(local)
        # version 20, no flags, DOS date 1980-01-01 (0x21), time 0
        local += struct.pack(
            "<4sHHHHHIIIHH",
            b"PK\x03\x04",
            20,
            0,
            method,
            0,
            0x21,
            crc,
            len(data),
            size,
            len(encoded),
            0,
        )
        local += encoded + data
        central += struct.pack(
            "<4sHHHHHHIIIHHHHHII",
            b"PK\x01\x02",
            20,
            20,
            0,
            method,
            0,
            0x21,
            crc,
            len(data),
            size,
            len(encoded),
            0,
            0,
            0,
            0,
            0,
            offset,
        )
        central += encoded
    end = struct.pack(
        "<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(local), 0
    )
    path.write_bytes(bytes(local + central + end))
    return path


def _deflated_zeros(size: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``size`` zero bytes and its CRC-32, built from one full-flushed
    1 MiB block repeated (identical once the history is reset), so a GB-scale bomb costs about
    a second and a few MB, never the GBs themselves."""
    block = bytes(1 << 20)
    assert size % len(block) == 0
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    again = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    assert first == again  # a full flush resets the history, so every block encodes the same
    stream = first * (size // len(block)) + deflate.flush()
    crc = 0
    for _ in range(size // len(block)):
        crc = zlib.crc32(block, crc)
    return stream, crc


_CONTENT_TYPES = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b'<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    b'<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.'
    b'relationships+xml"/><Override PartName="/word/document.xml" ContentType="application/'
    b'vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>'
)
_RELS = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b'<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    b'<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/'
    b'relationships/officeDocument" Target="word/document.xml"/></Relationships>'
)


def make_docx_bomb(path: Path, *, inflated: int, declared: int | None = None) -> Path:
    """A DOCX (content types, relationships) whose word/document.xml inflates to ``inflated``
    bytes; ``declared`` makes the headers claim a smaller size than the stream really holds."""
    stream, crc = _deflated_zeros(inflated)
    stored = [
        (name, data, 0, zlib.crc32(data), len(data))
        for name, data in (("[Content_Types].xml", _CONTENT_TYPES), ("_rels/.rels", _RELS))
    ]
    bomb = ("word/document.xml", stream, 8, crc, inflated if declared is None else declared)
    return _zip(path, [*stored, bomb])


def make_sparse(path: Path, size: int) -> Path:
    """A file of ``size`` bytes that occupies (almost) no disk: a hole made by truncate."""
    with path.open("wb") as out:
        out.truncate(size)
    return path


def elf_head() -> bytes:
    """The first 16 KiB of the running interpreter's binary: a real ELF header and code."""
    with open(os.path.realpath(sys.executable), "rb") as exe:
        data = exe.read(16 * 1024)
    if not data.startswith(b"\x7fELF"):
        pytest.skip("the interpreter is not an ELF binary on this platform")
    return data


# --- watching what gets opened -----------------------------------------------------------------

_OPENED: list[str] = []
_RECORDING: list[bool] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    # Audit hooks cannot be removed, so this one records only while a test switches it on.
    if _RECORDING and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


@pytest.fixture
def opened_here() -> Iterator[list[str]]:
    """Paths this process opens (hashing, reading) while the test runs."""
    if not getattr(sys, "_security_audit_hook", False):
        sys.addaudithook(_audit)
        sys._security_audit_hook = True  # type: ignore[attr-defined]
    _OPENED.clear()
    _RECORDING.append(True)
    yield _OPENED
    _RECORDING.clear()


_WORKER_HOOK = """
import os, sys
_log = os.open({log!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
def _hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        os.write(_log, os.fsencode(args[0]).replace(b"\\n", b"\\\\n") + b"\\n")
sys.addaudithook(_hook)
"""


@pytest.fixture
def opened_by_parser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[str]]:
    """Paths the parser process opens from Python (zipfile, read_bytes...): a sitecustomize on
    its PYTHONPATH installs an audit hook before anything runs. (pypdfium2 opens PDFs in C,
    unseen by audit hooks; the parse requests themselves are checked as well.)"""
    hook_dir = tmp_path / "audit-hook"
    hook_dir.mkdir()
    log = tmp_path / "parser-opens.log"
    (hook_dir / "sitecustomize.py").write_text(_WORKER_HOOK.format(log=str(log)))
    path = [str(hook_dir), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in path if p))

    def read() -> list[str]:
        if not log.exists():
            return []
        return [
            line.replace("\\n", "\n")
            for line in log.read_bytes().decode("utf-8", "surrogateescape").splitlines()
        ]

    return read


class RecordingParser:
    """The indexer's parser, with every path it is asked to parse written down."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.requests: list[Path] = []

    def parse(self, path: Path) -> ParsedDocument:
        self.requests.append(path)
        return self.inner.parse(path)


# --- the folder --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One hostile (or odd) file: where it lies and what must become of it."""

    name: str
    rel: str
    expect: str  # "indexed", "ignored" or the start of the failure reason
    word: str | None = None  # for indexed cases: the word that finds it


def build_folder(docs: Path, outside: Path) -> list[Case]:
    """Write the good documents, the hostile files and the outside canaries; return the cases."""
    outside.mkdir()
    (outside / "secret.txt").write_text(f"Outside secret {CANARY} for file links.\n")
    (outside / "secret.md").write_text(f"# Secret\n\nOutside {CANARY} via a relative link.\n")
    (outside / "dir").mkdir()
    (outside / "dir" / "inner.md").write_text(f"# Inner\n\nOutside {CANARY} in a folder.\n")

    docs.mkdir()
    for rel, (_word, text) in GOOD_TEXT.items():
        (docs / rel).parent.mkdir(parents=True, exist_ok=True)
        (docs / rel).write_text(text, encoding="utf-8")
    make_pdf(docs / "report.pdf", [("Deltareport", "The deltareport figures for the year.")])
    make_docx(docs / "memo.docx")
    make_html(docs / "page.html")
    cases = [
        Case("good markdown", "policy.md", "indexed", "alphapolicy"),
        Case("good text", "notes.txt", "indexed", "bravonotes"),
        Case("good markdown in a subfolder", "sub/deep.md", "indexed", "charliedeep"),
        Case("good PDF", "report.pdf", "indexed", "deltareport"),
        Case("good DOCX", "memo.docx", "indexed", "approval"),
        Case("good HTML", "page.html", "indexed", "degauss"),
    ]

    def add(name: str, rel: str, expect: str, word: str | None = None) -> None:
        cases.append(Case(name, rel, expect, word))

    # PDFs
    (docs / "corrupt.pdf").write_bytes(b"%PDF-1.7\n" + os.urandom(8192))
    add("corrupt PDF (header, then random bytes)", "corrupt.pdf", "not a valid PDF")
    whole = make_pdf(docs.parent / "whole.pdf").read_bytes()
    (docs / "truncated.pdf").write_bytes(whole[: len(whole) // 2])
    add("truncated PDF (first half)", "truncated.pdf", "not a valid PDF")
    make_pdf(docs / "encrypted.pdf", encrypt="secret")
    add("encrypted PDF (user password)", "encrypted.pdf", "encrypted PDF (password required)")

    # zip bombs and sizes
    make_docx_bomb(docs / "bomb.docx", inflated=2 * GIB)
    add("DOCX zip bomb: document.xml inflates to 2 GiB", "bomb.docx", "DOCX zip bomb")
    make_docx_bomb(docs / "lying-bomb.docx", inflated=1 * GIB, declared=4096)
    # zipfile's read() inflates a whole member before cutting it to the declared size, so
    # lying headers are stopped by the parser process's memory limit, not by the size check.
    add("DOCX zip bomb, headers claim 4 KiB for 1 GiB", "lying-bomb.docx", "needs more than")
    for suffix in (".txt", ".pdf"):
        make_sparse(docs / f"huge{suffix}", 2 * GIB)
        add(f"2 GiB sparse file as {suffix}", f"huge{suffix}", "file too large")

    # binary content under document suffixes
    for suffix in (".pdf", ".docx", ".html", ".md", ".txt"):
        (docs / f"random{suffix}").write_bytes(os.urandom(16 * 1024))
    add("random bytes as .pdf", "random.pdf", "not a valid PDF")
    add("random bytes as .docx", "random.docx", "not a valid DOCX (zip) file")
    for suffix in (".html", ".md", ".txt"):
        add(f"random bytes as {suffix}", f"random{suffix}", "binary content, not text")
    (docs / "program.txt").write_bytes(elf_head())
    add("an ELF executable as .txt", "program.txt", "binary content, not text")

    # names
    def named(name: str, rel: str, word: str) -> None:
        path = docs / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# Named\n\nThe {word} document.\n", encoding="utf-8")
        add(name, rel, "indexed", word)

    named("newline in the name", "line\nbreak.md", "echonewline")
    named("NFC name (é precomposed)", "caf\u00e9.md", "foxtrotnfc")
    named("NFD name (e + combining acute)", "cafe\u0301.md", "golfnfd")
    named("right-to-left override in the name", "invoice\u202egnp.md", "hotelrtl")
    named("Hebrew (RTL) name", "\u05de\u05e1\u05de\u05da.md", "indiahebrew")
    named("emoji name", "\U0001f4c4 notes \U0001f680.md", "julietemoji")
    named("leading dash", "-rf.md", "kilodash")
    named("leading double dash", "--help.txt", "limahelp")
    named("'..' inside the name", "a..b.md", "mikedots")
    named("'..' before the suffix", "notes..md", "novemberdots")
    named("folder named with '..' inside", "x..y/inside.md", "oscarfolder")
    (docs / "..foo.txt").write_text("The sierrahidden text.\n")
    add("name starting with '..' (a dot file)", "..foo.txt", "ignored")
    (docs / os.fsdecode(b"latin1-caf\xe9.md")).write_text("# L\n\nInvalid UTF-8 name.\n")
    add("name that is not UTF-8", "latin1-caf\\xe9.md", "file name is not valid UTF-8")

    # symlinks
    (docs / "link-file.txt").symlink_to(outside / "secret.txt")
    add("symlink to a file outside", "link-file.txt", "symlink points outside")
    (docs / "link-relative.md").symlink_to(Path("..") / outside.name / "secret.md")
    add("relative symlink ../outside/secret.md", "link-relative.md", "symlink points outside")
    (docs / "link-dir").symlink_to(outside / "dir", target_is_directory=True)
    add("symlink to a folder outside", "link-dir", "symlink points outside")
    (docs / "sub" / "link-up").symlink_to(Path("..") / "..", target_is_directory=True)
    add("symlink to the folder's parent (../..)", "sub/link-up", "symlink points outside")
    (docs / "loop.md").symlink_to(docs / "loop.md")
    add("symlink loop (to itself)", "loop.md", "symlink loop")
    (docs / "loop-a.md").symlink_to(docs / "loop-b.md")
    (docs / "loop-b.md").symlink_to(docs / "loop-a.md")
    add("symlink loop (a -> b -> a)", "loop-a.md", "symlink loop")
    add("symlink loop (b -> a -> b)", "loop-b.md", "symlink loop")
    (docs / "dangling.md").symlink_to(docs / "missing.md")
    add("dangling symlink inside", "dangling.md", "cannot read file")
    (docs / "alias.md").symlink_to(docs / "policy.md")
    add("symlink to a document inside", "alias.md", "indexed", "alphapolicy")
    return cases


# --- the test ----------------------------------------------------------------------------------


def _outcome(case: Case, status: dict[str, Any], indexed: set[str]) -> tuple[str, str]:
    failed = {f["path"]: f["reason"] for f in status["failed"]}
    if case.rel in failed:
        return "rejected", failed[case.rel]
    if case.rel in indexed:
        return "indexed", ""
    return "ignored", "hidden name (leading dot): never opened"


def _inside(path: str, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


def test_hostile_folder(
    make_indexer: Any,
    tmp_path: Path,
    opened_here: list[str],
    opened_by_parser: Callable[[], list[str]],
) -> None:
    docs, outside = tmp_path / "docs", tmp_path / "outside"
    cases = build_folder(docs, outside)
    huge = docs / "huge.txt"
    if huge.stat().st_blocks * 512 > 1 << 20:
        pytest.skip(f"{tmp_path} does not keep sparse files sparse")

    indexer: Indexer = make_indexer(docs)
    recording = RecordingParser(indexer.parser)
    indexer.parser = recording
    opened_here.clear()  # the test itself wrote the canaries; from here on only the indexer
    report = indexer.reconcile()
    status = indexer.status()
    indexed = set(indexer.state.files(indexer.collection)) - {f["path"] for f in status["failed"]}

    rows = []
    for case in cases:
        outcome, reason = _outcome(case, status, indexed)
        rows.append((case.name, outcome, reason))
        if case.expect == "indexed":
            assert outcome == "indexed", (case, reason)
        elif case.expect == "ignored":
            assert outcome == "ignored", (case, reason)
        else:
            assert outcome == "rejected", case
            assert reason.startswith(case.expect), (case, reason)
    print("\n| case | outcome | reason |\n|---|---|---|")
    for name, outcome, reason in rows:
        print(f"| {name!r} | {outcome} | {reason} |")

    # Every indexed case (the good documents first) is found by its own word, at its own path.
    for case in cases:
        if case.word is None:
            continue
        hits = search(indexer, case.word, 10, mode="sparse")
        assert case.rel in {h["path"] for h in hits}, (case, [h["path"] for h in hits])
    assert status["documents"] == sum(c.expect == "indexed" for c in cases)
    assert report.failed == sum(c.expect not in ("indexed", "ignored") for c in cases)

    # Nothing outside the folder was read...
    parsed = [str(p) for p in recording.requests]
    for what, paths in (
        ("parse request", parsed),
        ("open in this process", opened_here),
        ("open in the parser process", opened_by_parser()),
    ):
        leaked = [p for p in paths if _inside(p, outside) or CANARY in p]
        assert not leaked, f"{what} outside the folder: {leaked}"
    # The parser reads only the private copies made from the one descriptor each document
    # was opened with (ingest.safe_open), never a path in the documents folder.
    assert all(_inside(p, indexer.staging.folder) for p in parsed)
    assert any(p.endswith(".pdf") for p in parsed)  # the recording did see the parses
    assert any(p.endswith(".docx") for p in opened_by_parser())  # the hook did run
    assert not any(p.endswith("..foo.txt") for p in opened_here + opened_by_parser())
    assert not search(indexer, "sierrahidden", 5, mode="sparse")
    # ...so the canary is in no search result and in no byte of the data folder, where the
    # good documents' words are (the positive control that this grep would see it).
    for mode in ("sparse", "dense", "hybrid"):
        assert not any(CANARY in h["text"] for h in search(indexer, CANARY, 50, mode=mode))
    stored = b"".join(p.read_bytes() for p in (tmp_path / "data").rglob("*") if p.is_file())
    assert CANARY.encode() not in stored
    assert b"bravonotes" in stored

    # A second scan changes nothing and keeps every reason in status.
    again = indexer.reconcile()
    assert (again.added, again.updated, again.removed) == (0, 0, 0)
    assert indexer.status()["failed"] == status["failed"]


def test_a_document_replaced_by_an_outside_link_leaves_the_index(
    make_indexer: Any, tmp_path: Path
) -> None:
    docs, outside = tmp_path / "docs", tmp_path / "outside"
    docs.mkdir()
    outside.mkdir()
    (outside / "secret.md").write_text(f"# Secret\n\n{CANARY}\n")
    (docs / "keep.md").write_text("# Keep\n\nThe papakeep document.\n")
    (docs / "swap.md").write_text("# Swap\n\nThe quebecswap document.\n")
    indexer: Indexer = make_indexer(docs)
    assert indexer.reconcile().added == 2
    (docs / "swap.md").unlink()
    (docs / "swap.md").symlink_to(outside / "secret.md")
    report = indexer.reconcile()
    assert report.removed == 1
    assert indexer.status()["failed"] == [
        {"path": "swap.md", "reason": "symlink points outside the documents folder"}
    ]
    assert not search(indexer, "quebecswap", 5, mode="sparse")
    assert not search(indexer, CANARY, 5, mode="sparse")
    assert [h["path"] for h in search(indexer, "papakeep", 5, mode="sparse")] == ["keep.md"]
