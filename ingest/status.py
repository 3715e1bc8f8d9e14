"""What the index of one collection holds and what is pending, read from the ingestion state.

``Indexer.status`` (the core service's ``/status``) and a command's status without the service
(``appliance status``, no model loaded) both read it here, so the two agree field by field.
"""

from __future__ import annotations

import time
from typing import Any

from ingest.state import IngestState

HELD_DELETIONS = "held_deletions"
_WORKING = ("queued", "parsing", "embedding")


def index_status(
    state: IngestState, collection: str, *, stuck_after_s: float | None = None
) -> dict[str, Any]:
    """Documents, chunks, failures and files in progress of ``collection``. Files count as
    stuck after ``stuck_after_s`` in one state; None (no process is working on them): never."""
    files = state.files(collection)
    documents, chunks = state.counts(collection)
    now = time.time()
    ordered = sorted(files.values(), key=lambda r: r.path)
    return {
        "collection": collection,
        "documents": documents,
        "chunks": chunks,
        "failed": [
            {"path": r.path, "reason": r.reason or "failed"} for r in ordered if r.state == "failed"
        ],
        "in_progress": sorted(r.path for r in files.values() if r.state in _WORKING),
        "stuck": [
            {"path": r.path, "state": r.state, "seconds": round(now - r.state_since)}
            for r in ordered
            if stuck_after_s is not None
            and r.state in _WORKING
            and now - r.state_since > stuck_after_s
        ],
        "held_deletions": state.get_meta(HELD_DELETIONS),
    }
