"""fd-safe ingestion: a document is opened once, checked on the descriptor, and hashed and
parsed from those same bytes; FIFOs, devices and sockets are refused; a symlink may not leave
its collection."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest

from appliance.core.hashing import file_sha256
from ingest.pipeline import Indexer
from ingest.retrieval import search
from ingest.safe_open import Staging, UnsafeDocument, open_document

pytestmark = pytest.mark.integration


def reasons(indexer: Indexer) -> dict[str, str]:
    return {f["path"]: f["reason"] for f in indexer.status()["failed"]}


def test_special_files_are_refused_without_hanging(make_indexer: Any, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.md").write_text("# Good\n\nThe alphagood document.\n")
    os.mkfifo(docs / "pipe.md")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(docs / "sock.txt"))
        (docs / "zero.txt").symlink_to("/dev/zero")
        indexer: Indexer = make_indexer(docs)
        report = indexer.reconcile()  # a FIFO read would block here forever
    assert report.added == 1
    why = reasons(indexer)
    assert why["pipe.md"] == "not a regular file: a FIFO (named pipe)"
    assert why["sock.txt"] == "not a regular file: a socket"
    assert why["zero.txt"] == "symlink points outside the documents folder"


def test_symlinks_stay_inside_their_collection(make_indexer: Any, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    (docs / "legal").mkdir(parents=True)
    (docs / "hr").mkdir()
    (docs / "hr" / "salaries.md").write_text("# Salaries\n\nThe bravosalary table.\n")
    (docs / "legal" / "contract.md").write_text("# Contract\n\nThe charliecontract terms.\n")
    (docs / "legal" / "alias.md").symlink_to(docs / "legal" / "contract.md")
    (docs / "legal" / "leak.md").symlink_to(docs / "hr" / "salaries.md")
    (docs / "shared-leak.md").symlink_to(docs / "hr" / "salaries.md")
    indexer: Indexer = make_indexer(docs)
    indexer.reconcile()
    why = reasons(indexer)
    assert why["legal/leak.md"] == "symlink points outside its collection folder"
    assert why["shared-leak.md"].startswith("symlink points outside the top of the documents")
    paths = {h["path"] for h in search(indexer, "bravosalary", 10, mode="sparse")}
    assert paths == {"hr/salaries.md"}  # readers of legal/ or of the shared top never see it
    assert {h["path"] for h in search(indexer, "charliecontract", 10, mode="sparse")} == {
        "legal/contract.md",
        "legal/alias.md",
    }


def test_the_descriptor_is_checked_not_the_path(tmp_path: Path) -> None:
    docs, outside = tmp_path / "docs", tmp_path / "outside"
    (docs / "legal").mkdir(parents=True)
    outside.mkdir()
    (outside / "service.token").write_text("secret-token")
    (docs / "legal" / "a.md").symlink_to(outside / "service.token")
    with pytest.raises(UnsafeDocument, match="outside the documents folder"):
        open_document(docs, "legal/a.md")
    os.mkfifo(docs / "legal" / "f.md")
    with pytest.raises(UnsafeDocument, match="FIFO"):
        open_document(docs, "legal/f.md")


def test_hash_and_parse_come_from_the_same_bytes(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\n\nOne version.\n")
    staging = Staging()
    try:
        sha, copy = staging.copy(docs, "a.md", limit=1 << 20)
        (docs / "a.md").write_text("# A\n\nAnother version, written after the open.\n")
        assert file_sha256(copy) == sha  # what the parser reads is what was hashed
        assert copy.parent == staging.folder
        assert copy.suffix == ".md"
        assert staging.folder.stat().st_mode & 0o777 == 0o700
    finally:
        staging.close()
    assert not staging.folder.exists()
