"""A GGUF in-process through llama-cpp-python (the default chat backend).

The model holds one loaded model and lets one stream run at a time; it holds its lock from a
stream's first piece until the stream is exhausted or closed, so always exhaust a stream or use
it in a ``with`` block. llama_cpp is imported when a model is built.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

from appliance.chat.base import BaseChatModel, Usage, check_messages, decode_rate
from appliance.core.chat_template import CHATML_TEMPLATE, ChatTemplate
from appliance.core.errors import ConfigError, ModelError, missing_dependency
from appliance.core.hashing import file_sha256
from appliance.core.protocols import ChatMessage, GenerationParams

log = logging.getLogger(__name__)


def split_at_stop(pending: str, stops: Sequence[str]) -> tuple[str, str, bool]:
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


def llama_model(llm: Any) -> Any:
    """The ``llama_cpp`` model wrapper (``LlamaModel``: ``.model``, ``.vocab``, the special
    tokens) of a ``llama_cpp.Llama``, which offers no public handle on it. The one place that
    reads the library's private ``Llama._model``."""
    return llm._model


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
        model = llama_model(self._llm)
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
        checked = check_messages(messages)
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
        return self._template.render(check_messages(messages), add_generation_prompt=True)

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
    ) -> Generator[str, None, Usage]:
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
            vocab = llama_model(llm).vocab
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
                    ready, pending, stopped = split_at_stop(pending, stops)
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
                ready, _, _ = split_at_stop(rest, stops)
                if ready:
                    yield ready
            return Usage(
                model=self.name,
                prompt_tokens=len(tokens),
                completion_tokens=produced,
                finish_reason=finish,
                tokens_per_s=decode_rate(sampled, first, last),
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
