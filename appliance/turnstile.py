"""A line in front of the chat model: one generation at a time, first come first served, and
each waiting question told its place.

    Answerer.stream ──► queue.wait(lazy model stream) ──► {"type": "queue", "position": N} ...
                                                     └──► returns the stream, now holding the turn
                        with stream: ... pieces ...      closing or exhausting it lets the next in

The llama.cpp model already serialises generation with a lock, but a question blocked on a
lock says nothing: the person sees a spinner. Here the wait happens before the model is asked,
in a generator, so the answer stream can report the position (the number of questions ahead,
the one being answered included) each time it changes (and every few seconds while it does
not), and ``0`` once the turn comes.

``ModelQueue`` is the whole interface. ``Turnstile`` is the simple implementation for one
in-process model; ``Unqueued`` is for backends that queue or batch on their own (a model
server). Continuous batching with a fair queue in the core service replaces this later, behind
the same ``wait``.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Generator, Iterator
from types import TracebackType
from typing import Any, Protocol, Self

from appliance.core.protocols import ChatStream, Generation

QueueEvents = Generator[dict[str, Any], None, ChatStream]
"""Yields ``{"type": "queue", "position": N}`` events; returns the stream, holding the turn."""


class ModelQueue(Protocol):
    def wait(self, stream: ChatStream) -> QueueEvents:
        """Wait for the model's turn for ``stream`` (lazy: nothing generated yet), telling the
        position meanwhile; the returned stream gives the turn back when closed or exhausted.
        Closing this generator early leaves the line."""
        ...


class Unqueued:
    """No line: every stream starts at once (the backend does its own queueing)."""

    def wait(self, stream: ChatStream) -> QueueEvents:
        return stream
        yield  # a generator that yields nothing


class Turnstile:
    """One turn at a time, in arrival order. Thread-safe: each request runs in its own thread
    (the API server's), and only its own generator waits."""

    def __init__(self, *, heartbeat_s: float = 5.0) -> None:
        self._line: deque[object] = deque()
        self._changed = threading.Condition()
        self._heartbeat_s = heartbeat_s
        """A waiting request repeats its position this often: writing it to a client that went
        away fails, which closes the stream and takes the request out of the line, instead of
        the model later answering nobody."""

    @property
    def length(self) -> int:
        """Questions in line, the one holding the turn included."""
        with self._changed:
            return len(self._line)

    def wait(self, stream: ChatStream) -> QueueEvents:
        ticket = object()
        with self._changed:
            self._line.append(ticket)
        try:
            told = 0
            while True:
                with self._changed:
                    position = self._line.index(ticket)
                    if position == told and position > 0:
                        self._changed.wait(self._heartbeat_s)
                        position = self._line.index(ticket)
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

    def _leave(self, ticket: object) -> None:
        with self._changed:
            if ticket in self._line:
                self._line.remove(ticket)
                self._changed.notify_all()


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
