"""The composition root: ownership, and a change of embedding model."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.core.errors import StoreLockedError
from appliance.core.settings import Settings
from appliance.wiring import open_ingestion
from ingest.retrieval import search
from ingest.state import ACTIVE_COLLECTION
from tests.embedders import HashingEmbedder


def test_a_second_owner_is_refused(settings: Settings, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    with (
        open_ingestion(settings, docs, role="first", embedder=HashingEmbedder(64)),
        pytest.raises(StoreLockedError, match="first"),
    ):
        open_ingestion(settings, docs, role="second", embedder=HashingEmbedder(64))
    # released on close
    open_ingestion(settings, docs, role="third", embedder=HashingEmbedder(64)).close()


def test_new_embedding_model_reindexes_into_a_new_collection(
    settings: Settings, tmp_path: Path
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\n\nAlpha policy text about retention.\n")
    (docs / "b.txt").write_text("Beta contract text about delivery.\n")
    with open_ingestion(settings, docs, role="t", embedder=HashingEmbedder(64)) as first:
        first.indexer.reconcile()
        old = first.indexer.collection
        assert first.previous is None
    with open_ingestion(settings, docs, role="t", embedder=HashingEmbedder(32)) as second:
        new = second.indexer.collection
        assert new != old
        assert second.previous == old
        assert second.state.get_meta(ACTIVE_COLLECTION) == old  # not switched before complete
        report = second.indexer.reconcile()
        assert report.added == 2
        second.finish_switch()
        assert second.previous is None
        assert second.state.get_meta(ACTIVE_COLLECTION) == new
        assert second.backend.collections() == [new]
        assert second.state.counts(old) == (0, 0)
        assert search(second.searcher, "delivery contract", 1)[0]["path"] == "b.txt"
