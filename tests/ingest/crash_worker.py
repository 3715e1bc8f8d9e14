"""An ingestion process for the kill -9 test: ``python -m tests.ingest.crash_worker DATA DOCS``.

It is the real indexer (SQLite state, Qdrant Edge, the parser sandbox, the data-folder lock)
with the hashing embedder, so a kill can land anywhere in the write path many times a second.
"""

from __future__ import annotations

import sys
from pathlib import Path

from appliance.core.offline import enforce_offline
from appliance.core.ownership import DataDirLock
from appliance.core.settings import ChunkingSettings, IngestSettings
from ingest.embedders import Bm25Encoder
from ingest.parsers import supported_suffixes
from ingest.pipeline import Indexer
from ingest.sandbox import ParserSandbox
from ingest.state import IngestState
from ingest.store import EdgeBackend
from tests.embedders import HashingEmbedder

COLLECTION = "appliance_crash"


def open_indexer(data: Path, docs: Path) -> tuple[Indexer, list]:  # type: ignore[type-arg]
    state = IngestState(data / "ingest.sqlite3")
    backend = EdgeBackend(data / "index")
    sandbox = ParserSandbox(timeout_s=30, memory_mb=1024, max_text_chars=5_000_000)
    embedder = HashingEmbedder(64)
    indexer = Indexer(
        docs_dir=docs,
        state=state,
        store=backend.open(COLLECTION, embedder.dim),
        embedder=embedder,
        sparse=Bm25Encoder(),
        parser=sandbox,
        suffixes=supported_suffixes(),
        ingest=IngestSettings(mass_delete_fraction=1.0),
        chunking=ChunkingSettings(max_tokens=48, overlap_tokens=8),
        staging=sandbox.staging,
    )
    return indexer, [sandbox, backend, state]


def main(argv: list[str]) -> int:
    enforce_offline()
    data, docs = Path(argv[0]), Path(argv[1])
    with DataDirLock(data, "crash worker"):
        indexer, resources = open_indexer(data, docs)
        try:
            indexer.recover()
            print("reconciling", flush=True)  # the test times its kill from here
            report = indexer.reconcile(confirm_deletions=True)
            print(report.as_json(), flush=True)
        finally:
            for resource in resources:
                resource.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
