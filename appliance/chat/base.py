"""The chat-model interface and the stream machinery every backend shares.

    ChatModel (Protocol)              what the answer service talks to
     └── BaseChatModel                message checks, default parameters, complete(), closing
          ├── chat.llamacpp.LlamaCppChatModel           a GGUF in-process (the default)
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
from typing import Literal, Protocol, Self, TypedDict

from appliance.core.errors import ModelError

# --- interface -------------------------------------------------------------------------------

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")


class ChatMessage(TypedDict):
    """One turn of a conversation, in the shape Ollama and OpenAI servers take as JSON."""

    role: Role
    content: str


@dataclass(frozen=True)
class GenerationParams:
    """How to sample one answer. ``stop`` strings end the answer and are not part of it."""

    max_tokens: int = 384
    temperature: float = 0.1
    top_p: float = 0.95
    stop: Sequence[str] = ()
    seed: int | None = None
    repeat_penalty: float = 1.1
    """Penalty on recently generated tokens (1.0: none); small models loop without it."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {self.max_tokens}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be within [0, 2], not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be within (0, 1], not {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, not {self.stop!r}")


@dataclass(frozen=True)
class Generation:
    """What one generation cost. Times are seconds from the stream's first ``next()``;
    ``tokens_per_s`` is the decoding rate after the first token. ``queued_s`` is the part of
    ``ttft_s`` spent waiting for another thread's generation. ``estimated``: the token counts
    are estimates (a server that reported no usage)."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    total_s: float
    tokens_per_s: float
    finish_reason: str
    """"stop" (end of turn or a stop string), "length" (max_tokens or the context), or what the
    server said."""
    queued_s: float = 0.0
    estimated: bool = False


class ChatStream(Protocol):
    """Text pieces as they are generated (never empty strings); ``stats`` once exhausted."""

    def __iter__(self) -> Iterator[str]: ...

    def __next__(self) -> str: ...

    @property
    def stats(self) -> Generation | None:
        """None until the stream is exhausted (and after it was closed early)."""
        ...

    @property
    def text(self) -> str:
        """The pieces yielded so far, joined."""
        ...

    def close(self) -> None:
        """Stop generating; frees the model for the next stream."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class ChatModel(Protocol):
    """A chat model, local or behind a server. A context manager that frees the model."""

    @property
    def name(self) -> str:
        """Identifies the model for audit and the registry (a GGUF: file name and sha256)."""
        ...

    @property
    def context_length(self) -> int:
        """Tokens the prompt and the answer share."""
        ...

    def stream(
        self, messages: Sequence[ChatMessage], params: GenerationParams | None = None
    ) -> ChatStream: ...

    def complete(
        self, messages: Sequence[ChatMessage], params: GenerationParams | None = None
    ) -> tuple[str, Generation]: ...

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` for prompt budgeting: exact for llama.cpp, chars/4 for servers."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


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
