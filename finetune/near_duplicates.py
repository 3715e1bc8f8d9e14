"""Near-duplicate texts by shingle Jaccard similarity, with the standard library only.

A text becomes the set of its word 3-grams (lower case, punctuation as spaces, no articles),
and two texts are near-duplicates when the Jaccard similarity of those sets reaches a threshold.
``NearDuplicateIndex`` keeps an inverted index from shingle to texts, so a lookup compares only
with texts that share at least one shingle: exact similarities, without MinHash's sampling
error, at the sizes a training set has here (thousands of short questions).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable

_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]+")
_ARTICLES = frozenset({"a", "an", "the"})

DEFAULT_THRESHOLD = 0.7
"""Synthetic questions at or above this similarity are the same question reworded."""


def tokens(text: str) -> list[str]:
    """Lower-case words without punctuation or articles. Punctuation splits words here (unlike
    the evaluation's SQuAD normalisation, which deletes it): "carried-over" must compare equal
    to "carried over"."""
    return [w for w in _PUNCT.sub(" ", text.lower()).split() if w not in _ARTICLES]


def key(text: str) -> str:
    """The normalized text: equal keys are the same text up to case, punctuation, articles."""
    return " ".join(tokens(text))


def shingles(text: str, n: int = 3) -> frozenset[str]:
    """The word ``n``-grams of ``text``. A text shorter than ``n`` words is one shingle of all
    its words, so short questions still compare (as wholes) instead of matching nothing."""
    if n < 1:
        raise ValueError(f"shingle size must be at least 1, not {n}")
    words = tokens(text)
    if not words:
        return frozenset()
    if len(words) < n:
        return frozenset({" ".join(words)})
    return frozenset(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 0.0  # two empty texts say nothing alike; never call them duplicates
    return len(a & b) / len(a | b)


def similarity(a: str, b: str, n: int = 3) -> float:
    """Shingle Jaccard similarity of two texts, in [0, 1]."""
    return jaccard(shingles(a, n), shingles(b, n))


class NearDuplicateIndex:
    """Texts seen so far; ``match`` finds one at least ``threshold`` similar."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, n: int = 3) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be within (0, 1], not {threshold}")
        self.threshold = threshold
        self.n = n
        self._sets: list[frozenset[str]] = []
        self._keys: list[str] = []
        self._by_shingle: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self._sets)

    def match(self, text: str) -> str | None:
        """The key of the most similar indexed text at or above the threshold, or None."""
        found = self._best(shingles(text, self.n))
        return None if found is None else self._keys[found]

    def _best(self, probe: frozenset[str]) -> int | None:
        candidates: set[int] = set()
        for shingle in probe:
            candidates.update(self._by_shingle.get(shingle, ()))
        best, best_score = None, 0.0
        for i in sorted(candidates):  # sorted: ties resolve to the earliest text, every run
            score = jaccard(probe, self._sets[i])
            if score >= self.threshold and score > best_score:
                best, best_score = i, score
        return best

    def add(self, text: str, key: str | None = None) -> None:
        probe = shingles(text, self.n)
        index = len(self._sets)
        self._sets.append(probe)
        self._keys.append(key if key is not None else text)
        for shingle in probe:
            self._by_shingle.setdefault(shingle, []).append(index)

    def add_if_new(self, text: str, key: str | None = None) -> bool:
        """Index ``text`` unless a near-duplicate is there already; True when it was added."""
        if self.match(text) is not None:
            return False
        self.add(text, key)
        return True


def deduplicate(
    texts: Iterable[str], threshold: float = DEFAULT_THRESHOLD, n: int = 3
) -> list[int]:
    """Indices of the texts to keep: each text unless an earlier kept one is a near-duplicate."""
    index = NearDuplicateIndex(threshold, n)
    return [i for i, text in enumerate(texts) if index.add_if_new(text)]
