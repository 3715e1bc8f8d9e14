"""Query-side retrieval: turn a question into store queries and rank the chunks that come back.

Hybrid retrieval sends the dense and the BM25 sparse query to the store in one request and fuses
them there (reciprocal rank fusion), under the caller's payload filter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from appliance.protocols import Embedder, Hit, SearchMode, SparseEncoder, VectorStore


def retrieve(
    store: VectorStore,
    embedder: Embedder,
    sparse: SparseEncoder,
    query: str,
    k: int,
    *,
    mode: SearchMode = "hybrid",
    where: Mapping[str, Sequence[str]] | None = None,
) -> list[Hit]:
    """The top ``k`` chunks for ``query``."""
    dense = embedder.embed_query(query) if mode != "sparse" else None
    lexical = sparse.embed_query(query) if mode != "dense" else None
    return store.query(dense, lexical, k, mode=mode, where=where)
