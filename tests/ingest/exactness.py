"""The exact comparison of index and folder that crash and watcher tests rely on."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from appliance.core.hashing import file_sha256
from ingest.pipeline import Indexer
from ingest.scan import FoundFile, walk


def folder_hashes(indexer: Indexer) -> dict[str, str]:
    return {
        item.rel: file_sha256(item.path)
        for item in walk(indexer.docs_dir, indexer.suffixes)
        if isinstance(item, FoundFile)
    }


def index_problems(indexer: Indexer, docs: Path | None = None) -> list[str]:
    """Every way the index differs from the folder: missing, stale or duplicate chunks."""
    problems: list[str] = []
    coll = indexer.collection
    state = indexer.state
    files = state.files(coll)
    failed = {rel for rel, row in files.items() if row.state == "failed"}
    expected = {rel: h for rel, h in folder_hashes(indexer).items() if rel not in failed}
    indexed = {rel: row.indexed_sha256 for rel, row in files.items() if row.indexed_sha256}
    for rel, sha in expected.items():
        if indexed.get(rel) != sha:
            problems.append(f"missing or outdated: {rel}")
    for rel in indexed.keys() - expected.keys():
        problems.append(f"stale document: {rel}")
    for status in ("pending", "doomed"):
        if state.chunk_ids(coll, status):
            problems.append(f"{status} chunks left")
    live = set(state.chunk_ids(coll, "live"))
    in_store = indexer.store.ids()
    if in_store - live:
        problems.append(f"{len(in_store - live)} stale points in the store")
    if live - in_store:
        problems.append(f"{len(live - in_store)} live chunks missing from the store")
    for rel, row in files.items():
        if not row.indexed_sha256:
            continue
        chunks = state.live_chunks_of_path(coll, rel)
        if {c.sha256 for c in chunks} != {row.indexed_sha256}:
            problems.append(f"chunks of another version for {rel}")
        counts = Counter(c.chunk.index for c in chunks)
        if any(n > 1 for n in counts.values()) or len(chunks) != row.chunks:
            problems.append(f"duplicate or missing chunks for {rel}")
    return problems
