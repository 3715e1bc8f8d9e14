"""The vector store: Qdrant Edge in-process (default) or a Qdrant server by URL.

Both hold, per chunk, a dense vector ``dense`` (cosine) and a BM25 sparse vector ``bm25`` (IDF
applied by the engine), and fuse the two with reciprocal rank fusion in one query. One
parametrized test suite runs against both (the server path against ``QdrantClient(":memory:")``).

Qdrant Edge is young (0.9, beta): it stays behind this interface, its version is pinned, and its
write-ahead log stays on.
"""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from appliance.core.errors import StoreError, missing_dependency
from appliance.core.protocols import Hit, Point, SearchMode, SparseVector, VectorStore

DENSE = "dense"
SPARSE = "bm25"
RRF_K = 60
# Payload fields that filters use; both stores index them.
INDEXED_FIELDS = ("path", "collection", "doc_hash")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise StoreError(f"invalid collection name {name!r}: use letters, digits, _ and -")
    return name


def _prefetch_limit(limit: int) -> int:
    return max(50, limit * 5)


# --- Qdrant Edge -----------------------------------------------------------------------------


class EdgeStore:
    """One Qdrant Edge shard in a folder, with its write-ahead log on."""

    def __init__(self, path: Path, name: str, dim: int) -> None:
        try:
            import qdrant_edge as qe
        except ImportError as exc:
            raise missing_dependency("qdrant_edge", package="qdrant-edge-py==0.9.0") from exc
        self._qe = qe
        self._name = _check_name(name)
        self._path = path
        config = qe.EdgeConfig(
            vectors={DENSE: qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine)},
            sparse_vectors={SPARSE: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)},
            wal_enabled=True,
        )
        try:
            if (path / "edge_config.json").exists() or any(path.glob("segments*")):
                self._shard = qe.EdgeShard.load(str(path), config)
            else:
                path.mkdir(parents=True, exist_ok=True)
                self._shard = qe.EdgeShard.create(str(path), config)
                for field in INDEXED_FIELDS:
                    self._shard.update(
                        qe.UpdateOperation.create_field_index(field, qe.PayloadSchemaType.Keyword)
                    )
        except Exception as exc:  # the engine raises plain exceptions with its own message
            raise StoreError(f"cannot open the Qdrant Edge index in {path}: {exc}") from exc
        self._closed = False

    @property
    def name(self) -> str:
        return self._name

    def _sparse(self, sparse: SparseVector) -> Any:
        return self._qe.SparseVector(indices=sparse.indices, values=sparse.values)

    def upsert(self, points: Sequence[Point]) -> None:
        if not points:
            return
        qe = self._qe
        self._shard.update(
            qe.UpdateOperation.upsert_points(
                [
                    qe.Point(p.id, {DENSE: p.dense, SPARSE: self._sparse(p.sparse)}, p.payload)
                    for p in points
                ]
            )
        )

    def delete(self, ids: Sequence[str]) -> None:
        if ids:
            self._shard.update(self._qe.UpdateOperation.delete_points(list(ids)))

    def _filter(self, where: Mapping[str, Sequence[str]] | None) -> Any:
        if not where:
            return None
        qe = self._qe
        return qe.Filter(
            must=[qe.FieldCondition(key=k, match=qe.MatchAny(list(v))) for k, v in where.items()]
        )

    def query(
        self,
        dense: list[float] | None,
        sparse: SparseVector | None,
        limit: int,
        *,
        mode: SearchMode = "hybrid",
        where: Mapping[str, Sequence[str]] | None = None,
    ) -> list[Hit]:
        qe = self._qe
        flt = self._filter(where)
        dense_q = qe.Query.Nearest(dense, using=DENSE) if dense is not None else None
        sparse_q = (
            qe.Query.Nearest(self._sparse(sparse), using=SPARSE)
            if sparse is not None and sparse.indices
            else None
        )
        if mode == "dense" or (mode == "hybrid" and sparse_q is None):
            if dense_q is None:
                return []
            request = qe.QueryRequest(limit=limit, query=dense_q, filter=flt, with_payload=True)
        elif mode == "sparse" or dense_q is None:
            if sparse_q is None:
                return []
            request = qe.QueryRequest(limit=limit, query=sparse_q, filter=flt, with_payload=True)
        else:
            n = _prefetch_limit(limit)
            request = qe.QueryRequest(
                prefetches=[
                    qe.Prefetch(limit=n, query=dense_q, filter=flt),
                    qe.Prefetch(limit=n, query=sparse_q, filter=flt),
                ],
                query=qe.Fusion.Rrf(k=RRF_K),
                limit=limit,
                filter=flt,
                with_payload=True,
            )
        return [
            Hit(id=str(p.id), score=float(p.score), payload=dict(p.payload or {}))
            for p in self._shard.query(request)
        ]

    def count(self) -> int:
        return int(self._shard.count(self._qe.CountRequest(exact=True)))

    def ids(self) -> set[str]:
        out: set[str] = set()
        offset = None
        while True:
            records, offset = self._shard.scroll(
                self._qe.ScrollRequest(offset=offset, limit=2048, with_payload=False)
            )
            out.update(str(r.id) for r in records)
            if offset is None:
                return out

    def flush(self) -> None:
        self._shard.flush()

    def optimize(self) -> None:
        # Qdrant Edge builds its HNSW index and drops deleted points only when asked: at 100,000
        # chunks searches are 4-9x slower without it (benchmarks/search_latency.py). It holds
        # the process while it runs, so callers choose a quiet moment.
        self._shard.optimize()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._shard.flush()
            self._shard.close()


class EdgeBackend:
    """Collections as Qdrant Edge shards, one folder each under ``root``."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._open: dict[str, EdgeStore] = {}

    def open(self, name: str, dim: int) -> VectorStore:
        if name not in self._open:
            self._open[name] = EdgeStore(self._root / _check_name(name), name, dim)
        return self._open[name]

    def collections(self) -> list[str]:
        if not self._root.is_dir():
            return []
        return sorted(p.name for p in self._root.iterdir() if p.is_dir())

    def drop(self, name: str) -> None:
        store = self._open.pop(name, None)
        if store is not None:
            store.close()
        shutil.rmtree(self._root / _check_name(name), ignore_errors=True)

    def close(self) -> None:
        for store in self._open.values():
            store.close()
        self._open.clear()


# --- Qdrant server (qdrant-client) -----------------------------------------------------------


class ServerStore:
    """One collection on a Qdrant server (or ``QdrantClient(":memory:")`` in tests)."""

    def __init__(self, client: Any, name: str, dim: int) -> None:
        from qdrant_client import models

        self._client = client
        self._m = models
        self._name = _check_name(name)
        try:
            if not client.collection_exists(name):
                client.create_collection(
                    name,
                    vectors_config={
                        DENSE: models.VectorParams(size=dim, distance=models.Distance.COSINE)
                    },
                    sparse_vectors_config={
                        SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)
                    },
                )
                with warnings.catch_warnings():
                    # qdrant-client's local mode (tests) warns that it ignores payload indexes.
                    warnings.filterwarnings("ignore", message="Payload indexes have no effect")
                    for field in INDEXED_FIELDS:
                        client.create_payload_index(name, field, models.PayloadSchemaType.KEYWORD)
        except Exception as exc:
            raise StoreError(f"cannot open Qdrant collection {name!r}: {exc}") from exc

    @property
    def name(self) -> str:
        return self._name

    def _sparse(self, sparse: SparseVector) -> Any:
        return self._m.SparseVector(indices=sparse.indices, values=sparse.values)

    def upsert(self, points: Sequence[Point]) -> None:
        if not points:
            return
        m = self._m
        self._client.upsert(
            self._name,
            points=[
                m.PointStruct(
                    id=p.id,
                    vector={DENSE: p.dense, SPARSE: self._sparse(p.sparse)},
                    payload=p.payload,
                )
                for p in points
            ],
            wait=True,
        )

    def delete(self, ids: Sequence[str]) -> None:
        if ids:
            self._client.delete(
                self._name, points_selector=self._m.PointIdsList(points=list(ids)), wait=True
            )

    def _filter(self, where: Mapping[str, Sequence[str]] | None) -> Any:
        if not where:
            return None
        m = self._m
        return m.Filter(
            must=[m.FieldCondition(key=k, match=m.MatchAny(any=list(v))) for k, v in where.items()]
        )

    def query(
        self,
        dense: list[float] | None,
        sparse: SparseVector | None,
        limit: int,
        *,
        mode: SearchMode = "hybrid",
        where: Mapping[str, Sequence[str]] | None = None,
    ) -> list[Hit]:
        m = self._m
        flt = self._filter(where)
        has_sparse = sparse is not None and bool(sparse.indices)
        if mode == "dense" or (mode == "hybrid" and not has_sparse):
            if dense is None:
                return []
            result = self._client.query_points(
                self._name,
                query=dense,
                using=DENSE,
                limit=limit,
                query_filter=flt,
                with_payload=True,
            )
        elif mode == "sparse" or dense is None:
            if not has_sparse or sparse is None:
                return []
            result = self._client.query_points(
                self._name,
                query=self._sparse(sparse),
                using=SPARSE,
                limit=limit,
                query_filter=flt,
                with_payload=True,
            )
        else:
            assert sparse is not None
            n = _prefetch_limit(limit)
            result = self._client.query_points(
                self._name,
                prefetch=[
                    m.Prefetch(query=dense, using=DENSE, limit=n, filter=flt),
                    m.Prefetch(query=self._sparse(sparse), using=SPARSE, limit=n, filter=flt),
                ],
                query=m.RrfQuery(rrf=m.Rrf(k=RRF_K)),
                limit=limit,
                query_filter=flt,
                with_payload=True,
            )
        return [
            Hit(id=str(p.id), score=float(p.score), payload=dict(p.payload or {}))
            for p in result.points
        ]

    def count(self) -> int:
        return int(self._client.count(self._name, exact=True).count)

    def ids(self) -> set[str]:
        out: set[str] = set()
        offset = None
        while True:
            records, offset = self._client.scroll(
                self._name, limit=2048, offset=offset, with_payload=False, with_vectors=False
            )
            out.update(str(r.id) for r in records)
            if offset is None:
                return out

    def flush(self) -> None:
        """Writes are acknowledged with ``wait=True``; the server owns durability."""

    def optimize(self) -> None:
        """A Qdrant server optimizes its segments on its own."""

    def close(self) -> None:
        """The client belongs to the backend."""


class ServerBackend:
    """Collections on a Qdrant server, named ``<prefix>_...``."""

    def __init__(self, client: Any, prefix: str) -> None:
        self._client = client
        self._prefix = prefix

    @classmethod
    def from_url(cls, url: str, api_key: str | None, prefix: str) -> ServerBackend:
        try:
            from qdrant_client import QdrantClient
        except ImportError as exc:
            raise missing_dependency("qdrant_client", package="qdrant-client") from exc
        return cls(QdrantClient(url=url, api_key=api_key), prefix)

    def open(self, name: str, dim: int) -> VectorStore:
        return ServerStore(self._client, name, dim)

    def collections(self) -> list[str]:
        return sorted(
            c.name
            for c in self._client.get_collections().collections
            if c.name.startswith(self._prefix)
        )

    def drop(self, name: str) -> None:
        self._client.delete_collection(_check_name(name))

    def close(self) -> None:
        self._client.close()
