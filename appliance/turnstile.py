"""The line in front of the chat model: first come first served across users, at most a few
running questions per user, a number of generation slots, and a limit on the line's length.

    CoreService._ask ──► queue.admit(user)  (Busy: HTTP 503 with Retry-After beyond the limit)
      Answerer.stream ──► retrieval, evidence ──► "sources" event (while the line moves)
                      ──► queue.wait(lazy model stream, ticket) ──► {"type": "queue", ...} ...
                                                               └──► the stream, holding a slot
                          with stream: ... pieces ...   closing or exhausting it frees the slot

A question takes its place in line when it arrives (``admit``), before its retrieval, so the
order is arrival order and the 503 is decided before any work; its embedding and retrieval run
while it waits, and its sources reach the client before the model's turn. ``wait`` happens in a
generator, so the answer stream reports the position (the number of questions ahead, one being
answered included) each time it changes (and every few seconds while it does not), and ``0``
once a slot is taken.

A waiting question takes a free slot when no question that arrived before it could take one:
questions of a user who already has ``per_user`` answers running wait, and those behind them
may pass (one person's burst cannot hold every slot). ``slots`` is the chat backend's parallel
generations (``chat.parallel``: 1 for the serial llama.cpp engine).

``ModelQueue`` is the whole interface. ``FairQueue`` is the implementation; ``Turnstile`` is
its one-slot, unlimited form; ``Unqueued`` lets every stream start at once.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from types import TracebackType
from typing import Any, Protocol, Self

from appliance.core.errors import Busy
from appliance.core.protocols import ChatStream, Generation

QueueEvents = Generator[dict[str, Any], None, ChatStream]
"""Yields ``{"type": "queue", "position": N}`` events; returns the stream, holding the turn."""

DEFAULT_SERVICE_S = 10.0
"""The time one answer holds a slot, assumed until answers have been timed (Retry-After)."""
MAX_RETRY_AFTER_S = 600


class QueueObserver(Protocol):
    """What the queue reports (``appliance.metrics.Metrics`` implements it)."""

    def queue_changed(self, waiting: int, running: int) -> None: ...

    def queue_waited(self, seconds: float) -> None: ...

    def queue_rejected(self) -> None: ...


class Ticket:
    """A question's place in line, from its arrival (``admit``) to the end of its answer.
    ``close()`` gives the place (or the slot) back; it is safe to call more than once."""

    __slots__ = ("_leave", "arrived", "ready", "started", "user")

    def __init__(self, user: str, arrived: float, leave: Callable[[Ticket], None]) -> None:
        self.user = user
        self.arrived = arrived
        self.ready = False
        """Its retrieval is done and it waits for a slot (``wait`` was called)."""
        self.started: float | None = None
        self._leave = leave

    def close(self) -> None:
        self._leave(self)


class ModelQueue(Protocol):
    def admit(self, user: str = "") -> Ticket:
        """Take a place in line for a question of ``user`` ("" for no per-user limit), or
        raise :class:`~appliance.core.errors.Busy` when the line is full."""
        ...

    def wait(self, stream: ChatStream, ticket: Ticket | None = None) -> QueueEvents:
        """Wait for the model's turn for ``stream`` (lazy: nothing generated yet), telling the
        position meanwhile; the returned stream gives the turn back when closed or exhausted.
        Without a ``ticket`` the question joins the line now, past any limit. Closing this
        generator early leaves the line."""
        ...


class Unqueued:
    """No line: every stream starts at once."""

    def admit(self, user: str = "") -> Ticket:
        return Ticket(user, time.monotonic(), lambda _t: None)

    def wait(self, stream: ChatStream, ticket: Ticket | None = None) -> QueueEvents:
        return stream
        yield  # a generator that yields nothing


class FairQueue:
    """Arrival order across users, ``per_user`` running answers per user, ``slots`` answers
    at once, and at most ``limit`` questions waiting (None: no limit). Thread-safe: each
    request runs in its own thread (the API server's), and only its own generator waits."""

    def __init__(
        self,
        *,
        slots: int = 1,
        per_user: int = 1,
        limit: int | None = None,
        heartbeat_s: float = 5.0,
        observer: QueueObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if slots < 1 or per_user < 1 or (limit is not None and limit < 0):
            raise ValueError("a queue needs slots >= 1, per_user >= 1 and limit >= 0")
        self.slots = slots
        self.per_user = per_user
        self.limit = limit
        self.observer = observer
        self._clock = clock
        self._line: list[Ticket] = []
        self._running: list[Ticket] = []
        self._held_s: deque[float] = deque(maxlen=32)
        self._changed = threading.Condition()
        self._heartbeat_s = heartbeat_s
        """A waiting request repeats its position this often: writing it to a client that went
        away fails, which closes the stream and takes the request out of the line, instead of
        the model later answering nobody."""

    @property
    def length(self) -> int:
        """Questions in line, those being answered included."""
        with self._changed:
            return len(self._line) + len(self._running)

    @property
    def waiting(self) -> int:
        with self._changed:
            return len(self._line)

    @property
    def ready(self) -> int:
        """Waiting questions whose retrieval is done: those told their place."""
        with self._changed:
            return sum(t.ready for t in self._line)

    @property
    def running(self) -> int:
        with self._changed:
            return len(self._running)

    def retry_after_s(self) -> int:
        """When a refused question likely finds room: the recent mean time an answer holds a
        slot, times the answers that must finish first for the line to drop below its limit,
        over the slots."""
        with self._changed:
            return self._retry_after()

    def _retry_after(self) -> int:
        held = sum(self._held_s) / len(self._held_s) if self._held_s else DEFAULT_SERVICE_S
        excess = len(self._line) - (self.limit or 0) + 1
        rounds = max(1, excess) / self.slots
        return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(held * rounds))))

    def admit(self, user: str = "") -> Ticket:
        with self._changed:
            free = self.slots - len(self._running)
            if self.limit is not None and len(self._line) + 1 - max(free, 0) > self.limit:
                retry = self._retry_after()
                if self.observer is not None:
                    self.observer.queue_rejected()
                raise Busy(
                    f"the appliance is busy: {len(self._line)} questions are waiting for the "
                    f"model (the limit is {self.limit}); try again in {retry} s",
                    retry_after_s=retry,
                )
            return self._join(user)

    def _join(self, user: str) -> Ticket:
        ticket = Ticket(user, self._clock(), self._leave)
        self._line.append(ticket)
        self._report()
        return ticket

    def wait(self, stream: ChatStream, ticket: Ticket | None = None) -> QueueEvents:
        if ticket is None:
            with self._changed:
                ticket = self._join("")
        with self._changed:
            ticket.ready = True
            self._dispatch()
        try:
            told = 0
            while True:
                with self._changed:
                    position = self._position(ticket)
                    if position == told and position > 0:
                        self._changed.wait(self._heartbeat_s)
                        position = self._position(ticket)
                if position == 0:
                    break
                told = position
                yield {"type": "queue", "position": position}
            if told:
                yield {"type": "queue", "position": 0}
        except BaseException:  # closed while waiting (the client went away), or failed
            self._leave(ticket)
            raise
        return _Turn(stream, lambda: self._leave(ticket))

    def _position(self, ticket: Ticket) -> int:
        """Questions ahead: those waiting before it, plus one being answered; 0 once it holds
        a slot."""
        return self._line.index(ticket) + 1 if ticket in self._line else 0

    def _dispatch(self) -> None:
        """Give free slots to the waiting questions that may start, in arrival order (the
        slot is handed over here, so nobody behind can take it before the next one's thread
        runs)."""
        moved = False
        while len(self._running) < self.slots:
            running_of: dict[str, int] = {}
            for t in self._running:
                running_of[t.user] = running_of.get(t.user, 0) + 1
            chosen = next(
                (
                    t
                    for t in self._line
                    if t.ready and not (t.user and running_of.get(t.user, 0) >= self.per_user)
                ),
                None,
            )
            if chosen is None:
                break
            self._line.remove(chosen)
            self._running.append(chosen)
            chosen.started = self._clock()
            if self.observer is not None:
                self.observer.queue_waited(chosen.started - chosen.arrived)
            moved = True
        if moved:
            self._report()
            self._changed.notify_all()

    def _leave(self, ticket: Ticket) -> None:
        with self._changed:
            if ticket in self._line:
                self._line.remove(ticket)
            elif ticket in self._running:
                self._running.remove(ticket)
                if ticket.started is not None:
                    self._held_s.append(self._clock() - ticket.started)
            else:
                return
            self._report()
            self._dispatch()
            self._changed.notify_all()

    def _report(self) -> None:
        if self.observer is not None:
            self.observer.queue_changed(len(self._line), len(self._running))


class Turnstile(FairQueue):
    """One answer at a time, in arrival order, with no limit: the serial engine's line."""

    def __init__(self, *, heartbeat_s: float = 5.0, observer: QueueObserver | None = None):
        super().__init__(slots=1, per_user=1, heartbeat_s=heartbeat_s, observer=observer)


class _Turn:
    """A ``ChatStream`` that holds the turn: closing or exhausting it gives the turn back
    (after the model's own stream is closed, so the next one finds the model free)."""

    def __init__(self, stream: ChatStream, release: Any) -> None:
        self._stream = stream
        self._release = release
        self._held = True

    def _give_back(self) -> None:
        if self._held:
            self._held = False
            self._release()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            return next(self._stream)
        except BaseException:  # StopIteration included: the answer is complete
            self._give_back()
            raise

    @property
    def stats(self) -> Generation | None:
        return self._stream.stats

    @property
    def text(self) -> str:
        return self._stream.text

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._give_back()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
