"""The chat-model interface and the stream machinery every backend shares.

    ChatModel (Protocol)              what the answer service talks to
     └── BaseChatModel                message checks, default parameters, complete(), closing
          ├── chat.llamacpp.LlamaCppChatModel           a GGUF in-process, serially
          │    └── chat.batching.BatchedLlamaCppChatModel  answers decoded together, the
          │                                                default; chat.parallel: 1 keeps
          │                                                the serial one
          └── chat.servers.ServerChatModel              a model server by URL
               ├── OllamaChatModel                     Ollama, through the official client
               └── OpenAICompatibleChatModel           any /v1/chat/completions (vLLM, ...)

``stream(messages, params)`` returns a ``ChatStream``: an iterator of text pieces as they are
generated, whose ``stats`` (a ``Generation``) are filled in once it is exhausted. A stream is
lazy: nothing runs until the first piece is asked for. Backends implement ``_generate``, a
generator of pieces that returns a ``Usage``; ``PieceStream`` times it.

``appliance.chat.factory.build_chat_model(settings.chat)`` picks the backend.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from appliance.core.errors import ModelError
from appliance.core.protocols import (
    ROLES,
    ChatMessage,
    Generation,
    GenerationParams,
)

# --- the shared base -------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """What a backend reports when its generator returns; the stream adds the timings."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    tokens_per_s: float | None = None
    """None: measured from the arrival of the pieces."""
    queued_s: float = 0.0
    estimated: bool = False


def decode_rate(tokens: int, first: float | None, last: float | None) -> float:
    """Tokens per second after the first one, from the times of the first and the last."""
    if tokens > 1 and first is not None and last is not None and last > first:
        return (tokens - 1) / (last - first)
    return 0.0


class PieceStream:
    """The ``ChatStream`` of ``BaseChatModel``: wraps a backend generator that yields pieces
    and returns a ``Usage``, and times it."""

    def __init__(self, pieces: Generator[str, None, Usage]) -> None:
        self._pieces = pieces
        self._parts: list[str] = []
        self._stats: Generation | None = None
        self._done = False
        self._started: float | None = None
        self._first: float | None = None
        self._last: float | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        if self._started is None:
            self._started = time.perf_counter()
        while True:
            try:
                piece = next(self._pieces)
            except StopIteration as end:
                self._finish(end.value)
                raise StopIteration from None
            except BaseException:
                self._done = True
                raise
            if piece:
                now = time.perf_counter()
                if self._first is None:
                    self._first = now
                self._last = now
                self._parts.append(piece)
                return piece

    def _finish(self, usage: Usage) -> None:
        self._done = True
        end = time.perf_counter()
        started = self._started if self._started is not None else end
        rate = usage.tokens_per_s
        if rate is None:
            rate = decode_rate(usage.completion_tokens, self._first, self._last)
        self._stats = Generation(
            model=usage.model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            ttft_s=(self._first if self._first is not None else end) - started,
            total_s=end - started,
            tokens_per_s=rate,
            finish_reason=usage.finish_reason,
            queued_s=usage.queued_s,
            estimated=usage.estimated,
        )

    @property
    def stats(self) -> Generation | None:
        return self._stats

    @property
    def text(self) -> str:
        return "".join(self._parts)

    @property
    def finished(self) -> bool:
        return self._stats is not None

    def close(self) -> None:
        self._done = True
        self._pieces.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def check_messages(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    if not messages:
        raise ValueError("a chat needs at least one message")
    checked: list[ChatMessage] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} has content of type {type(content).__name__}, not str")
        checked.append(ChatMessage(role=role, content=content))
    return checked


class BaseChatModel(ABC):
    """Backends implement ``_generate`` (a generator of pieces that returns a ``Usage``),
    ``name``, ``context_length``, ``count_tokens`` and ``_close``; the rest lives here."""

    def __init__(self, default_params: GenerationParams | None = None) -> None:
        self.default_params = default_params or GenerationParams()
        self._closed = False

    @property
    @abstractmethod
    def name(self) -> str: ...

    @property
    @abstractmethod
    def context_length(self) -> int: ...

    @abstractmethod
    def count_tokens(self, text: str) -> int: ...

    @abstractmethod
    def _generate(
        self, messages: list[ChatMessage], params: GenerationParams
    ) -> Generator[str, None, Usage]: ...

    @abstractmethod
    def _close(self) -> None: ...

    def stream(
        self, messages: Sequence[ChatMessage], params: GenerationParams | None = None
    ) -> PieceStream:
        if self._closed:
            raise ModelError(f"the chat model {self.name} is closed")
        return PieceStream(self._generate(check_messages(messages), params or self.default_params))

    def pieces(
        self, messages: list[ChatMessage], params: GenerationParams
    ) -> Generator[str, None, Usage]:
        """The backend's own generator (``_generate``), for a model that answers through
        another (``appliance.active_model``): its caller's ``stream`` checked the messages and
        turns the pieces into one ``PieceStream``."""
        return self._generate(messages, params)

    def complete(
        self, messages: Sequence[ChatMessage], params: GenerationParams | None = None
    ) -> tuple[str, Generation]:
        with self.stream(messages, params) as stream:
            for _ in stream:
                pass
            stats = stream.stats
            assert stats is not None  # an exhausted stream always has its stats
            return stream.text, stats

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def estimate_tokens(text: str) -> int:
    return (len(text) + 3) // 4


def estimate_prompt_tokens(messages: Sequence[ChatMessage]) -> int:
    return sum(estimate_tokens(m["content"]) + 4 for m in messages)
