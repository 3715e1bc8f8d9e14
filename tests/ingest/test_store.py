"""One suite for both VectorStore implementations: Qdrant Edge and a Qdrant server (the server
code path runs against ``QdrantClient(":memory:")``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.core.errors import StoreError
from appliance.core.protocols import Point, StoreBackend
from ingest.embedders import Bm25Encoder
from ingest.store import EdgeBackend, ServerBackend
from tests.embedders import HashingEmbedder

TEXTS = {
    "a.txt": "Apple quarterly report: iPhone revenue grew in the third quarter.",
    "b.txt": "Microsoft Azure cloud revenue and operating income.",
    "c/d.txt": "Amazon Web Services segment results and retail sales.",
    "c/e.txt": "Audit logs are retained for seven years under policy AP-12.",
}


@pytest.fixture(params=["edge", "server"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreBackend]:
    if request.param == "edge":
        b: StoreBackend = EdgeBackend(tmp_path / "index")
    else:
        from qdrant_client import QdrantClient

        b = ServerBackend(QdrantClient(":memory:"), "appliance")
    yield b
    b.close()


def points() -> list[Point]:
    embedder, bm25 = HashingEmbedder(64), Bm25Encoder()
    out = []
    for path, text in TEXTS.items():
        out.append(
            Point(
                id=str(uuid.uuid5(uuid.NAMESPACE_URL, path)),
                dense=embedder.embed([text])[0],
                sparse=bm25.embed_document(text),
                payload={
                    "path": path,
                    "collection": path.split("/")[0] if "/" in path else "",
                    "text": text,
                },
            )
        )
    return out


def test_upsert_count_ids_delete(backend: StoreBackend) -> None:
    store = backend.open("appliance_t", 64)
    pts = points()
    store.upsert(pts)
    store.upsert(pts)  # idempotent
    assert store.count() == 4
    assert store.ids() == {p.id for p in pts}
    store.delete([pts[0].id])
    store.optimize()
    assert store.count() == 3
    assert pts[0].id not in store.ids()
    assert backend.collections() == ["appliance_t"]


@pytest.mark.parametrize("mode", ["hybrid", "dense", "sparse"])
def test_query_modes_find_the_matching_chunk(backend: StoreBackend, mode: str) -> None:
    store = backend.open("appliance_t", 64)
    store.upsert(points())
    embedder, bm25 = HashingEmbedder(64), Bm25Encoder()
    query = "Azure cloud revenue"
    hits = store.query(embedder.embed_query(query), bm25.embed_query(query), 2, mode=mode)  # type: ignore[arg-type]
    assert hits[0].payload["path"] == "b.txt"
    assert len(hits) <= 2


def test_filters_apply_inside_the_query(backend: StoreBackend) -> None:
    store = backend.open("appliance_t", 64)
    store.upsert(points())
    embedder, bm25 = HashingEmbedder(64), Bm25Encoder()
    query = "Azure cloud revenue"
    hits = store.query(
        embedder.embed_query(query), bm25.embed_query(query), 10, where={"collection": ["c"]}
    )
    assert hits
    assert {h.payload["path"] for h in hits} <= {"c/d.txt", "c/e.txt"}


def test_drop_and_bad_names(backend: StoreBackend) -> None:
    backend.open("appliance_t", 64).upsert(points())
    backend.drop("appliance_t")
    assert backend.collections() == []
    with pytest.raises(StoreError, match="invalid collection name"):
        backend.open("../escape", 64)


def test_edge_index_survives_reopen(tmp_path: Path) -> None:
    backend = EdgeBackend(tmp_path / "index")
    backend.open("appliance_t", 64).upsert(points())
    backend.close()
    again = EdgeBackend(tmp_path / "index")
    try:
        assert again.open("appliance_t", 64).count() == 4
    finally:
        again.close()
