"""The shared embedding model takes turns: a question's query goes before queued bulk work,
and bulk work holds the model one small batch at a time (so the evidence a person waits for
is not queued behind a new document's chunks)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from appliance.core.priority_lock import BULK, URGENT, PriorityLock
from ingest.embedders import TURN_TEXTS, SentenceTransformerEmbedder


def test_waiters_go_by_priority_then_arrival() -> None:
    lock = PriorityLock()
    order: list[str] = []
    lock.acquire()
    threads = []
    for name, priority in (("bulk-1", BULK), ("bulk-2", BULK), ("query", URGENT)):
        t = threading.Thread(
            target=lambda n=name, p=priority: (lock.acquire(p), order.append(n), lock.release())
        )
        t.start()
        threads.append(t)
        while lock.waiting < len(threads):  # each is queued before the next arrives
            time.sleep(0.001)
    lock.release()
    for t in threads:
        t.join(timeout=5)
    assert order == ["query", "bulk-1", "bulk-2"]


def test_releasing_a_free_lock_is_an_error() -> None:
    lock = PriorityLock()
    with lock.hold(URGENT):
        assert lock.waiting == 0
    with pytest.raises(RuntimeError, match="not held"):
        lock.release()


def test_bulk_embeds_in_turns_and_keeps_the_input_order(
    real_embedder: SentenceTransformerEmbedder,
) -> None:
    texts = [f"Policy note {i}: " + "retention " * (i % 7) for i in range(TURN_TEXTS * 2 + 3)]
    together = np.asarray(real_embedder.embed(texts))
    one_by_one = np.asarray([real_embedder.embed([t])[0] for t in texts])
    assert together.shape == (len(texts), real_embedder.dim)
    # the same vector for each text whatever the batch it was encoded in
    assert np.allclose(together, one_by_one, atol=1e-4)
    query = np.asarray(real_embedder.embed_query(texts[5]))
    assert np.allclose(query, one_by_one[5], atol=1e-4)
    urgent = np.asarray(real_embedder.embed_urgent(texts[:4]))
    assert np.allclose(urgent, one_by_one[:4], atol=1e-4)


def test_a_query_overtakes_bulk_work_queued_before_it(
    real_embedder: SentenceTransformerEmbedder,
) -> None:
    """While one bulk job holds the model and another waits, a query arriving last is
    encoded before the waiting bulk job starts."""
    finished: list[str] = []
    many = [f"Chunk {i} of a long new document about records retention." for i in range(200)]
    bulk_a = threading.Thread(target=lambda: (real_embedder.embed(many), finished.append("a")))
    bulk_b = threading.Thread(target=lambda: (real_embedder.embed(many), finished.append("b")))
    bulk_a.start()
    bulk_b.start()
    time.sleep(0.05)
    real_embedder.embed_query("How long are audit logs kept?")
    finished.append("query")
    bulk_a.join(timeout=120)
    bulk_b.join(timeout=120)
    assert finished[0] == "query", finished
