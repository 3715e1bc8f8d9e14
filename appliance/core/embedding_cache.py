"""The embeddings answering asks for, remembered by text.

Colleagues ask about the same documents: the same passages are scored against each question,
the same passage sentences checked for orders to the model and compared with answer sentences.
Each of those texts is embedded once while it stays in the cache, not once per question, which
keeps the one shared embedding model free for what a person is waiting on. A vector is a
deterministic function of its text, so a cached one is the vector the model would give.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.core.protocols import Embedder


class CachedEmbedder:
    """``embedder`` with a least-recently-used cache of up to ``entries`` vectors (float32:
    1.5 KiB each at 384 dimensions). ``entries`` 0: no cache, every call goes through."""

    def __init__(self, embedder: Embedder, entries: int) -> None:
        self._embedder = embedder
        self._entries = entries
        self._cache: OrderedDict[tuple[bool, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def model_id(self) -> str:
        return self._embedder.model_id

    @property
    def dim(self) -> int:
        return self._embedder.dim

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        return self._embedder.token_spans(text)

    def embed(self, texts: Sequence[str], *, urgent: bool = False) -> list[list[float]]:
        """``urgent``: a person's evidence waits on these (the model's ``embed_urgent`` where
        it has one: they go before bulk work queued for it)."""
        found = self._lookup([(False, t) for t in texts])
        missing = list(dict.fromkeys(t for t, v in zip(texts, found, strict=True) if v is None))
        if missing:
            encode = getattr(self._embedder, "embed_urgent", None) if urgent else None
            vectors = (encode or self._embedder.embed)(missing)
            fresh = dict(zip(missing, vectors, strict=True))
            self._store([((False, t), v) for t, v in fresh.items()])
            found = [v if v is not None else fresh[t] for t, v in zip(texts, found, strict=True)]
        return [list(map(float, v)) for v in found]

    def embed_query(self, text: str) -> list[float]:
        (found,) = self._lookup([(True, text)])
        if found is None:
            found = self._embedder.embed_query(text)
            self._store([((True, text), found)])
        return list(map(float, found))

    def _lookup(self, keys: list[tuple[bool, str]]) -> list[Any]:
        out: list[Any] = []
        with self._lock:
            for key in keys:
                vector = self._cache.get(key)
                if vector is not None:
                    self._cache.move_to_end(key)
                    self.hits += 1
                else:
                    self.misses += 1
                out.append(vector)
        return out

    def _store(self, items: list[tuple[tuple[bool, str], Sequence[float]]]) -> None:
        if self._entries <= 0:
            return
        import numpy as np

        with self._lock:
            for key, vector in items:
                self._cache[key] = np.asarray(vector, dtype=np.float32)
                self._cache.move_to_end(key)
            while len(self._cache) > self._entries:
                self._cache.popitem(last=False)
