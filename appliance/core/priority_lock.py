"""A lock whose waiters are served by priority, then by arrival.

The embedding model is one shared engine: a person's question (one short text, the evidence
waits for it) and bulk work (a new document's chunks, an answer's sentence checks) take turns
on it. With a plain lock a question could wait behind every bulk batch queued before it; here
it waits for the batch running now at most, since bulk work holds the lock one small batch at
a time.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager

URGENT = 0
"""Someone is waiting on this: a question's own embedding."""

BULK = 1
"""Work in the background of a person's wait: chunks being indexed, sentences being checked."""


class PriorityLock:
    """Mutual exclusion; on release, the waiter with the lowest (priority, arrival) goes next."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._held = False
        self._waiting: list[tuple[int, int]] = []
        self._arrivals = itertools.count()

    @contextmanager
    def hold(self, priority: int = BULK) -> Iterator[None]:
        self.acquire(priority)
        try:
            yield
        finally:
            self.release()

    def acquire(self, priority: int = BULK) -> None:
        with self._cond:
            if not self._held and not self._waiting:
                self._held = True
                return
            me = (priority, next(self._arrivals))
            heapq.heappush(self._waiting, me)
            try:
                while self._held or self._waiting[0] != me:
                    self._cond.wait()
            except BaseException:
                self._waiting.remove(me)
                heapq.heapify(self._waiting)
                self._cond.notify_all()
                raise
            heapq.heappop(self._waiting)
            self._held = True

    def release(self) -> None:
        with self._cond:
            if not self._held:
                raise RuntimeError("release of a PriorityLock that is not held")
            self._held = False
            if self._waiting:
                self._cond.notify_all()

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)
