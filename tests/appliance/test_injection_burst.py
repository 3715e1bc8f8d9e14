"""A burst of questions at start-up: the instruction detector's exemplars are embedded once,
not once per question that arrives before the first finishes."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from appliance.core.injection import ORDERS, ORDINARY, InstructionDetector
from tests.embedders import HashingEmbedder


class SlowEmbedder(HashingEmbedder):
    """Encoding takes time, as a real model's does: the others arrive meanwhile."""

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        time.sleep(0.05)
        return super().embed(texts)


def test_exemplars_are_embedded_once_under_a_burst() -> None:
    model = SlowEmbedder()
    detector = InstructionDetector(model)
    start = threading.Barrier(8)

    def ask(n: int) -> None:
        start.wait()
        detector.flags([f"Sentence number {n} of a passage."])

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert model.embedded_texts == len(ORDERS) + len(ORDINARY) + 8
