"""The indexer against real files, the real parser sandbox and Qdrant Edge (hashing embedder)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.core.audience import collection_of
from appliance.core.settings import IngestSettings
from ingest.pipeline import Indexer
from ingest.retrieval import search
from tests.embedders import HashingEmbedder
from tests.ingest.exactness import index_problems

POLICY = (
    "# Policy\n\n## Retention\n\nAudit logs are kept for seven years.\n\n"
    "## Access\n\nOnly admins.\n"
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    write(folder / "policy.md", POLICY)
    write(folder / "hr" / "leave.txt", "LEAVE\n\nStaff get 30 days of leave per year.\n")
    return folder


def test_first_ingest_then_unchanged(make_indexer, docs: Path) -> None:  # type: ignore[no-untyped-def]
    indexer: Indexer = make_indexer(docs)
    report = indexer.reconcile()
    assert (report.added, report.updated, report.removed, report.failed) == (2, 0, 0, 0)
    assert report.chunks > 0
    assert index_problems(indexer) == []
    again = indexer.reconcile()
    assert (again.added, again.unchanged, again.chunks) == (0, 2, 0)


def test_payload_carries_citation_fields(make_indexer, docs: Path) -> None:  # type: ignore[no-untyped-def]
    indexer: Indexer = make_indexer(docs)
    indexer.reconcile()
    hits = search(indexer, "How long are audit logs kept?", 3)
    top = next(h for h in hits if h["path"] == "policy.md")
    assert top["heading"] == "Policy > Retention"
    assert "seven years" in top["text"]
    assert collection_of("hr/leave.txt") == "hr"
    assert collection_of("policy.md") == ""


def test_changed_file_replaces_its_chunks(make_indexer, docs: Path) -> None:  # type: ignore[no-untyped-def]
    indexer: Indexer = make_indexer(docs)
    indexer.reconcile()
    old_ids = {
        c.point_id for c in indexer.state.live_chunks_of_path(indexer.collection, "policy.md")
    }
    write(docs / "policy.md", POLICY.replace("seven", "ten"))
    report = indexer.reconcile()
    assert report.updated == 1
    new = indexer.state.live_chunks_of_path(indexer.collection, "policy.md")
    assert not old_ids & {c.point_id for c in new}
    assert not old_ids & indexer.store.ids()
    assert any("ten years" in c.chunk.text for c in new)
    assert index_problems(indexer) == []


def test_deleted_file_loses_its_chunks(make_indexer, docs: Path) -> None:  # type: ignore[no-untyped-def]
    indexer: Indexer = make_indexer(docs)
    indexer.reconcile()
    (docs / "policy.md").unlink()
    report = indexer.reconcile()
    assert report.removed == 1
    assert indexer.state.live_chunks_of_path(indexer.collection, "policy.md") == []
    assert index_problems(indexer) == []


def test_rename_and_move_reuse_vectors(make_indexer, docs: Path) -> None:  # type: ignore[no-untyped-def]
    embedder = HashingEmbedder(64)
    indexer: Indexer = make_indexer(docs, embedder=embedder)
    indexer.reconcile()
    embedded = embedder.embedded_texts
    os.rename(docs / "policy.md", docs / "policy-2024.md")
    os.renames(docs / "hr" / "leave.txt", docs / "archive" / "leave.txt")
    report = indexer.reconcile()
    assert (report.added, report.removed) == (2, 2)
    assert embedder.embedded_texts == embedded  # nothing re-embedded
    hits = search(indexer, "leave days", 5)
    assert {h["path"] for h in hits} >= {"archive/leave.txt"}
    assert index_problems(indexer) == []


def test_identical_content_indexed_twice_embedded_once(make_indexer, docs: Path) -> None:  # type: ignore[no-untyped-def]
    embedder = HashingEmbedder(64)
    indexer: Indexer = make_indexer(docs, embedder=embedder)
    write(docs / "copy" / "policy.md", POLICY)
    indexer.reconcile()
    chunks_a = indexer.state.live_chunks_of_path(indexer.collection, "policy.md")
    chunks_b = indexer.state.live_chunks_of_path(indexer.collection, "copy/policy.md")
    assert len(chunks_a) == len(chunks_b) > 0
    unique_texts = {c.text_key for c in chunks_a} | {
        c.text_key for c in indexer.state.live_chunks_of_path(indexer.collection, "hr/leave.txt")
    }
    assert embedder.embedded_texts == len(unique_texts)
    paths = {h["path"] for h in search(indexer, "audit logs retention", 10)}
    assert {"policy.md", "copy/policy.md"} <= paths


def test_failed_reparse_keeps_last_good_version(make_indexer, docs: Path) -> None:  # type: ignore[no-untyped-def]
    indexer: Indexer = make_indexer(docs)
    indexer.reconcile()
    good = {
        c.point_id for c in indexer.state.live_chunks_of_path(indexer.collection, "hr/leave.txt")
    }
    (docs / "hr" / "leave.txt").write_bytes(b"\x00\x01binary\x00" * 100)
    report = indexer.reconcile()
    assert report.failed == 1
    assert "binary" in report.failures[0]["reason"]
    assert {
        c.point_id for c in indexer.state.live_chunks_of_path(indexer.collection, "hr/leave.txt")
    } == good
    assert good <= indexer.store.ids()
    status = indexer.status()
    assert status["failed"] == [{"path": "hr/leave.txt", "reason": report.failures[0]["reason"]}]
    # unchanged failed files are not retried; a fixed file is
    assert indexer.reconcile().failed == 1
    write(docs / "hr" / "leave.txt", "Staff now get 32 days of leave.\n")
    assert indexer.reconcile().updated == 1
    assert indexer.status()["failed"] == []


def test_bad_files_do_not_stop_ingestion(make_indexer, docs: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (docs / "broken.pdf").write_bytes(b"%PDF-1.7 this is not a pdf")
    (docs / "empty.txt").write_bytes(b"")
    (docs / "odd\nname ü ..md").write_text(
        "# Odd\n\nA file with a strange name.\n", encoding="utf-8"
    )
    outside = write(tmp_path / "secret.txt", "secret outside the folder")
    (docs / "link.txt").symlink_to(outside)
    indexer: Indexer = make_indexer(docs, ingest=IngestSettings(max_file_mb=0.001))
    write(docs / "big.txt", "x" * 5000)
    report = indexer.reconcile()
    reasons = {f["path"]: f["reason"] for f in report.failures}
    assert "not a valid PDF" in reasons["broken.pdf"] or "PDF" in reasons["broken.pdf"]
    assert "empty" in reasons["empty.txt"]
    assert "outside" in reasons["link.txt"]
    assert "too large" in reasons["big.txt"]
    assert report.added == 3  # policy.md, hr/leave.txt and the odd name
    texts = " ".join(h["text"] for h in search(indexer, "secret outside the folder", 20))
    assert "secret outside" not in texts


def test_temporary_and_hidden_files_are_ignored(make_indexer, docs: Path) -> None:  # type: ignore[no-untyped-def]
    for name in (
        "~$report.docx",
        ".hidden.md",
        "notes.md.swp",
        ".~lock.a.docx#",
        "x.tmp",
        "4913",
        "unknown.xyz",
    ):
        write(docs / name, "temporary")
    indexer: Indexer = make_indexer(docs)
    report = indexer.reconcile()
    assert report.added == 2
    assert report.failed == 0


def test_mass_deletion_is_held_until_confirmed(make_indexer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    docs = tmp_path / "many"
    for i in range(12):
        write(docs / f"doc{i}.txt", f"document number {i}\n")
    indexer: Indexer = make_indexer(docs)
    indexer.reconcile()
    for i in range(10):
        (docs / f"doc{i}.txt").unlink()
    held = indexer.reconcile()
    assert held.held_deletions == 10
    assert held.removed == 0
    assert indexer.status()["held_deletions"] == "10/12"
    assert indexer.state.counts(indexer.collection)[0] == 12
    applied = indexer.reconcile(confirm_deletions=True)
    assert applied.removed == 10
    assert indexer.status()["held_deletions"] is None
    assert index_problems(indexer) == []


def test_moving_most_documents_is_not_a_mass_deletion(make_indexer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A reorganised folder (everything moved into subfolders) loses nothing: not held."""
    docs = tmp_path / "many"
    for i in range(12):
        write(docs / f"doc{i}.txt", f"document number {i}\n")
    indexer: Indexer = make_indexer(docs)
    indexer.reconcile()
    (docs / "archive").mkdir()
    for i in range(10):
        (docs / f"doc{i}.txt").rename(docs / "archive" / f"doc{i}.txt")
    report = indexer.reconcile()
    assert report.held_deletions == 0
    assert report.removed == 10
    assert indexer.state.counts(indexer.collection)[0] == 12
    assert index_problems(indexer) == []


def test_recover_undoes_half_done_writes(make_indexer, docs: Path) -> None:  # type: ignore[no-untyped-def]
    indexer: Indexer = make_indexer(docs)
    indexer.reconcile()
    # A process killed after upserting a new version but before committing it, and one killed
    # after dooming points but before deleting them, and a stray point nobody recorded:
    write(docs / "policy.md", POLICY + "\nNew paragraph.\n")
    prepared = indexer._prepare_lexical(next(f for f in _found(indexer) if f.rel == "policy.md"))
    assert prepared is not None
    assert not isinstance(prepared, str)
    ready = indexer._embed(prepared)
    from ingest.state import ChunkRow

    rows = [
        ChunkRow(
            indexer.point_id("policy.md", ready.sha256, c.index), "policy.md", ready.sha256, c, k
        )
        for c, k in zip(ready.chunks, ready.text_keys, strict=True)
    ]
    indexer.state.add_pending(indexer.collection, rows)
    from appliance.core.protocols import Point

    indexer.store.upsert(
        [
            Point(r.point_id, v, indexer.sparse.embed_document(r.chunk.text), {"path": "policy.md"})
            for r, v in zip(rows, ready.vectors, strict=True)
        ]
    )
    doomed = indexer.state.doom_path(indexer.collection, "hr/leave.txt")
    assert doomed
    result = indexer.recover()
    assert result["pending"] == len(rows)
    assert result["doomed"] == len(doomed)
    report = indexer.reconcile()
    assert report.added + report.updated == 2  # both files indexed again from the folder
    assert index_problems(indexer) == []


def _found(indexer: Indexer):  # type: ignore[no-untyped-def]
    from ingest.scan import FoundFile, walk

    return [f for f in walk(indexer.docs_dir, indexer.suffixes) if isinstance(f, FoundFile)]
