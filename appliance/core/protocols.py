"""The small interfaces the appliance is built from, and the plain data passed between them.

Implementations are picked in ``appliance.wiring`` from the settings; nothing else names them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Protocol, Self, TypedDict

# --- documents -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """A run of extracted text under one page or heading. ``heading`` is the heading path
    ("Part I > Item 2"), ``page`` is 1-based; either may be None where the format has none.

    ``ocr_confidence`` is set (0..1, the OCR engine's mean word confidence) when the text was
    recognised from an image rather than read from a text layer. ``header`` marks a table: the
    text's first lines up to and including ``header`` (its caption and column headers) are
    repeated at the top of every chunk cut from it, and every other line is one row that a
    chunk never splits."""

    text: str
    page: int | None = None
    heading: str | None = None
    ocr_confidence: float | None = None
    header: str | None = None


@dataclass(frozen=True)
class ParsedDocument:
    """What a parser extracts from one file."""

    sections: list[Section]
    title: str | None = None
    """A title from the file's own metadata (PDF info, DOCX core properties, HTML <title>)."""
    pages: int | None = None


@dataclass(frozen=True)
class Chunk:
    """One piece of a document as indexed. ``start``/``end`` are character offsets in the
    extracted text (the sections joined by blank lines); a table chunk's text is its section's
    header followed by ``extracted[start:end]`` (the rows). ``ocr_confidence`` as in
    :class:`Section`; ``table`` is true for the rows of a table section, which retrieval
    searches on their own as well (see ``ingest.retrieval``)."""

    index: int
    text: str
    start: int
    end: int
    page: int | None
    heading: str | None
    ocr_confidence: float | None = None
    table: bool = False


# --- vectors ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseVector:
    indices: list[int]
    values: list[float]


@dataclass(frozen=True)
class Point:
    """A chunk as the vector store holds it."""

    id: str
    dense: list[float]
    sparse: SparseVector
    payload: dict[str, Any]


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    payload: dict[str, Any] = field(default_factory=dict)


SearchMode = Literal["hybrid", "dense", "sparse"]


class Embedder(Protocol):
    """A dense text embedding model. Vectors are L2-normalised."""

    @property
    def model_id(self) -> str:
        """Names the model and its weights; a new id means a new collection."""
        ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...

    def embed_query(self, text: str) -> list[float]: ...

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the model's tokens in ``text`` (chunking counts these)."""
        ...


class SparseEncoder(Protocol):
    """Lexical (BM25) sparse vectors; the store applies IDF."""

    def embed_document(self, text: str) -> SparseVector: ...

    def embed_query(self, text: str) -> SparseVector: ...


class VectorStore(Protocol):
    """One collection of chunk points with a dense and a BM25 sparse vector each.

    ``where`` filters are ``{payload_key: [allowed values]}``, applied inside the query.
    """

    @property
    def name(self) -> str: ...

    def upsert(self, points: Sequence[Point]) -> None: ...

    def delete(self, ids: Sequence[str]) -> None: ...

    def query(
        self,
        dense: list[float] | None,
        sparse: SparseVector | None,
        limit: int,
        *,
        mode: SearchMode = "hybrid",
        where: Mapping[str, Sequence[str]] | None = None,
    ) -> list[Hit]: ...

    def count(self) -> int: ...

    def ids(self) -> set[str]: ...

    def flush(self) -> None: ...

    def optimize(self) -> None:
        """Build the search indexes after a large batch of writes (a no-op where the store
        does it on its own)."""
        ...

    def close(self) -> None: ...


class StoreBackend(Protocol):
    """Opens, lists and drops collections (Qdrant Edge shards or Qdrant server collections)."""

    def open(self, name: str, dim: int) -> VectorStore: ...

    def collections(self) -> list[str]: ...

    def drop(self, name: str) -> None: ...

    def close(self) -> None: ...


# --- chat models -------------------------------------------------------------------------------

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
