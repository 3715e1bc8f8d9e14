"""Answering's embedding cache: each text is encoded once while it is remembered, and the
vectors are the model's own."""

from __future__ import annotations

import numpy as np

from appliance.core.embedding_cache import CachedEmbedder
from tests.embedders import HashingEmbedder


def test_texts_seen_before_are_not_encoded_again() -> None:
    model = HashingEmbedder()
    cached = CachedEmbedder(model, entries=100)
    texts = ["Audit logs are kept for seven years.", "Backups run at 02:00.", "Badges."]
    first = cached.embed(texts)
    assert model.embedded_texts == 3
    again = cached.embed([texts[1], "A new sentence.", texts[1]])
    assert model.embedded_texts == 4  # only the new one, once
    assert np.allclose(again[0], first[1])
    assert np.allclose(again[2], first[1])
    assert np.allclose(first, model.embed(texts), atol=1e-6)
    assert cached.hits == 2
    assert (cached.model_id, cached.dim) == (model.model_id, model.dim)


def test_the_least_recently_used_text_goes_first() -> None:
    model = HashingEmbedder()
    cached = CachedEmbedder(model, entries=2)
    cached.embed(["a b", "c d"])
    cached.embed(["a b"])  # "a b" is now the more recent
    cached.embed(["e f"])  # over the bound: "c d" leaves
    before = model.embedded_texts
    cached.embed(["a b", "e f"])
    assert model.embedded_texts == before
    cached.embed(["c d"])
    assert model.embedded_texts == before + 1


def test_queries_are_remembered_and_zero_entries_keeps_nothing() -> None:
    model = HashingEmbedder()
    cached = CachedEmbedder(model, entries=10)
    q = cached.embed_query("How long are audit logs kept?")
    assert np.allclose(q, model.embed_query("How long are audit logs kept?"), atol=1e-6)
    cached.embed_query("How long are audit logs kept?")
    assert cached.hits == 1
    off = CachedEmbedder(model, entries=0)
    off.embed(["x y"])
    off.embed(["x y"])
    assert off.hits == 0


def test_urgent_texts_go_through_the_models_urgent_path_where_it_has_one() -> None:
    class Urgent(HashingEmbedder):
        urgent_calls = 0

        def embed_urgent(self, texts: list[str]) -> list[list[float]]:
            self.urgent_calls += 1
            return self.embed(texts)

    model = Urgent()
    cached = CachedEmbedder(model, entries=10)
    cached.embed(["a passage"], urgent=True)
    cached.embed(["another passage"])
    assert model.urgent_calls == 1
    assert np.allclose(
        CachedEmbedder(HashingEmbedder(), 0).embed(["x"], urgent=True), [model.embed(["x"])[0]]
    )
