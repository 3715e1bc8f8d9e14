"""Continuous batching for the in-process llama.cpp model: several answers decode together.

On a CPU, decoding one sequence reads every weight for one token; a batch of eight sequences
reads them once for eight tokens. ``BatchedLlamaCppChatModel`` keeps one loaded model and one
llama.cpp context with ``slots`` sequences, and a scheduler thread that runs decode steps::

    API threads                          scheduler thread (owns the llama.cpp context)
    stream() ─► tokenise ─► waiting ───► admit into a free slot (reusing a cached prefix)
                                         ┌► one batch per step: a token for every decoding slot,
    pieces  ◄── each request's queue ◄───┤  then up to ``prefill_chunk`` prompt tokens
                                         └► sample per slot; stop strings, max tokens, end of
                                            turn; a finished or cancelled request leaves

New requests join at the next step and finished ones leave; a long prompt is fed in chunks so
that it does not stall the others' tokens. Each slot is its own KV stream (``kv_unified`` off):
a token attends only to its own sequence, so eight long prompts cost eight times one, not 64.

Prefix reuse: a slot keeps its sequence's KV cache after its request ends. A new request takes
the free slot whose cache shares the longest prefix with its prompt (the system prompt and
template, and the same passages: ``appliance.core.prompting`` puts passages before the question),
and when another slot, busy or free, shares a longer one, its cache is copied over first
(``llama_memory_seq_cp``) and trimmed to the common prefix. Only the rest is prefilled.
Beyond the slots, the KV cache a slot is about to lose is saved in host memory
(``llama_state_seq_get_data``, up to ``prefix_cache_bytes``, least recently used out first) and
put back into a slot (``llama_state_seq_set_data``) when a later prompt shares more with it than
with any slot: colleagues ask about the same passages long after eight other questions went by.

Behaviour matches ``LlamaCppChatModel`` through the ``ChatModel`` interface: the same template
and tokenisation (``prompt_tokens``), the same sampler chain and seeds, end-of-turn markers and
stop strings, the answer's leading blanks dropped, ``finish_reason`` and ``Generation``. A
stream that is closed (a client that went away) leaves its slot at the next step. Unlike the
serial model, one thread may hold several streams at once.

``chat.parallel: 1`` keeps the serial ``LlamaCppChatModel``; ``llamacpp_chat_model`` in
``appliance.chat.factory`` picks the engine (``auto_parallel`` sizes the default).
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.chat.base import Usage, decode_rate
from appliance.chat.llamacpp import LlamaCppChatModel, llama_model, split_at_stop
from appliance.core.errors import ModelError
from appliance.core.protocols import ChatMessage, GenerationParams

log = logging.getLogger(__name__)

MAX_AUTO_SLOTS = 8
"""Past eight sequences a CPU's decode step is compute-bound: more slots add latency, not
throughput (llama.cpp's own server starts with four)."""
SLOTS_PER_CORE = 4
KV_MEMORY_SHARE = 0.25
"""The share of available memory the automatic slot count may give to the KV cache."""
PREFIX_CACHE_SHARE = 0.1
"""The share of available memory the automatic host-memory prefix cache may take."""
MAX_AUTO_PREFIX_CACHE = 1 << 30
MIN_COPY_GAIN = 16
"""Prompt tokens another slot's cache must save beyond the chosen slot's own before it is
copied (a copy moves the whole stream buffer; a few tokens are cheaper to prefill)."""

# Llama.generate's sampler chain, so that a seed samples what it samples in the serial model.
_PENALTY_LAST_N = 64
_TOP_K = 40
_MIN_P = 0.05
_TYPICAL_P = 1.0


def kv_bytes_per_token(llama_cpp: Any, model: Any) -> int:
    """Bytes of f16 K and V cache one token takes across the model's layers."""
    n_head = max(1, int(llama_cpp.llama_model_n_head(model)))
    head_dim = int(llama_cpp.llama_model_n_embd(model)) // n_head
    n_head_kv = int(llama_cpp.llama_model_n_head_kv(model))
    return int(llama_cpp.llama_model_n_layer(model)) * 2 * n_head_kv * head_dim * 2


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable), or 0 when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def auto_parallel(cores: int, memory: int, kv_per_slot: int) -> tuple[int, str]:
    """Slots for ``chat.parallel`` left empty, and why: four per core up to eight, fewer
    when a quarter of the available memory cannot hold their KV caches."""
    by_cores = max(1, min(MAX_AUTO_SLOTS, SLOTS_PER_CORE * cores))
    if memory <= 0 or kv_per_slot <= 0:
        return by_cores, f"{cores} cores -> {by_cores} slots (available memory unknown)"
    by_memory = max(1, int(memory * KV_MEMORY_SHARE) // kv_per_slot)
    slots = min(by_cores, by_memory)
    return slots, (
        f"{cores} cores -> {by_cores} slots; KV cache {kv_per_slot / 2**20:.0f} MiB per slot, "
        f"{KV_MEMORY_SHARE:.0%} of {memory / 2**30:.1f} GiB available -> {by_memory}"
    )


def _is_prefix(a: Sequence[int], b: Sequence[int]) -> bool:
    return len(a) <= len(b) and _common_prefix(a, b) == len(a)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the scheduler's counters (for metrics and benchmarks)."""

    slots: int
    active: int
    waiting: int
    steps: int
    """Decode steps run."""
    batched_tokens: int
    """Tokens decoded in those steps (prompt and generated)."""
    last_batch_sequences: int
    """Sequences in the last step's batch."""
    generated_tokens: int
    prompt_tokens: int
    """Prompt tokens of admitted requests."""
    reused_prompt_tokens: int
    """Of those, tokens whose KV cache was reused instead of prefilled."""
    copied_prefixes: int
    """Admissions that copied another slot's cache."""
    restored_prefixes: int = 0
    """Admissions that put back a cache saved in host memory."""
    saved_prefixes: int = 0
    saved_prefix_bytes: int = 0
    """Caches kept in host memory now, and their size."""


@dataclass(frozen=True)
class StepInfo:
    """One decode step, as told to step observers."""

    sequences: int
    """Requests in the batch (decoding or being prefilled)."""
    tokens: int
    prefill_tokens: int
    seconds: float
    """The decode call and the sampling after it."""


StepObserver = Callable[[StepInfo], None]


@dataclass
class _Request:
    tokens: list[int]
    budget: int
    params: GenerationParams
    stops: tuple[str, ...]
    seed: int
    submitted: float
    out: queue.SimpleQueue[str | Usage | BaseException] = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False
    done: bool = False


@dataclass
class _Saved:
    """A sequence's KV cache kept in host memory, for the tokens it was computed from."""

    tokens: list[int]
    data: Any
    size: int


@dataclass
class _Slot:
    seq: int
    cached: list[int] = field(default_factory=list)
    """The tokens whose KV this sequence holds, at positions 0, 1, ..."""
    request: _Request | None = None
    sampler: Any = None
    fed: int = 0
    """Prompt tokens in the cache; the prompt is prefilled while ``fed < len(tokens)``."""
    next_token: int | None = None
    """Sampled, to be decoded in the next step."""
    released: float = 0.0
    queued_s: float = 0.0
    decoder: Any = None
    pending: str = ""
    at_start: bool = True
    produced: int = 0
    sampled: int = 0
    first: float | None = None
    last: float | None = None
    out_index: int = -1


class BatchedLlamaCppChatModel(LlamaCppChatModel):
    """One GGUF, ``slots`` sequences decoded together by a scheduler thread. Thread-safe."""

    def __init__(
        self,
        path: Path,
        *,
        slots: int | None = None,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        seed: int | None = None,
        prefill_chunk: int = 128,
        prefix_cache_bytes: int | None = None,
        default_params: GenerationParams | None = None,
    ) -> None:
        """``prefix_cache_bytes``: host memory for KV caches saved from slots (None: a tenth of
        the available memory, at most 1 GiB; 0: none)."""
        if slots is not None and slots < 1:
            raise ValueError(f"slots must be at least 1, not {slots}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, not {prefill_chunk}")
        self._slots_n = slots or 0  # 0: sized in _load, once the model's KV size is known
        self._chunk = prefill_chunk
        if prefix_cache_bytes is None:
            prefix_cache_bytes = min(
                MAX_AUTO_PREFIX_CACHE, int(available_memory() * PREFIX_CACHE_SHARE)
            )
        self._saved_limit = max(0, prefix_cache_bytes)
        self._saved: OrderedDict[int, _Saved] = OrderedDict()
        self._saved_bytes = 0
        self._saved_ids = 0
        self._restores = 0
        self._ctx: Any = None
        self._batch: Any = None
        self._thread: threading.Thread | None = None
        # The parent loads the model (the Llama object serves tokenising and the template) and
        # calls _load, which here also builds the batched context.
        try:
            super().__init__(
                path, n_ctx=n_ctx, n_threads=n_threads, seed=seed, default_params=default_params
            )
        except BaseException:
            self._free_context()
            raise
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._slots = [_Slot(seq=i) for i in range(self._slots_n)]
        self._stopping = False
        self._steps = self._batched = self._last_batch = self._generated = 0
        self._prompt_total = self._reused = self._copies = 0
        self._observers: list[StepObserver] = []
        self._thread = threading.Thread(
            target=self._run, name=f"llama-batch-{path.name}", daemon=True
        )
        self._thread.start()

    # --- loading -----------------------------------------------------------------------------

    def _load(self, n_ctx: int) -> Any:
        llama_cpp = self._llama_cpp
        # The Llama object's own context is never decoded with: a small one keeps its KV tiny.
        llm = super()._load(min(n_ctx, 256))
        model = llama_model(llm).model
        self._slot_ctx = n_ctx
        self._kv_per_token = kv_bytes_per_token(llama_cpp, model)
        if not self._slots_n:
            self._slots_n, why = auto_parallel(
                os.cpu_count() or 1, available_memory(), self._kv_per_token * n_ctx
            )
            log.info("chat.parallel is empty: %d slots (%s)", self._slots_n, why)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * self._slots_n
        params.n_seq_max = self._slots_n
        params.kv_unified = False
        params.n_batch = params.n_ubatch = self._chunk + self._slots_n
        params.n_threads = params.n_threads_batch = self._threads
        # As Llama(flash_attn=False) does: the same kernels as the serial model.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            llm.close()
            raise ModelError(
                f"llama.cpp could not make a context of {self._slots_n} slots x {n_ctx} tokens "
                f"for {self._path.name}; lower chat.parallel (APPLIANCE_CHAT__PARALLEL) or "
                "chat.n_ctx (APPLIANCE_CHAT__N_CTX)"
            )
        self._ctx = ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        self._vocab = llama_model(llm).vocab
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        per_seq = int(llama_cpp.llama_n_ctx_seq(ctx))
        if per_seq < n_ctx:
            log.info("llama.cpp gave each slot %d tokens of context, not %d", per_seq, n_ctx)
            self._slot_ctx = per_seq
        log.info(
            "chat model %s: %d slots x %d tokens, KV cache %.0f MiB per slot, prefill %d "
            "tokens per step",
            self._path.name,
            self._slots_n,
            self._slot_ctx,
            self.kv_bytes_per_slot / 2**20,
            self._chunk,
        )
        return llm

    # --- ChatModel ---------------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        return self._slot_ctx

    @property
    def slots(self) -> int:
        """Sequences decoded together; a queue in front may admit this many at once."""
        return self._slots_n

    @property
    def kv_bytes_per_slot(self) -> int:
        return self._kv_per_token * self._slot_ctx

    def add_step_observer(self, observer: StepObserver) -> None:
        """Call ``observer`` after every decode step, in the scheduler thread (metrics: batch
        size per step, tokens per second). It must be quick: the next step waits for it."""
        self._observers.append(observer)

    def engine_stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(
                slots=self._slots_n,
                active=sum(1 for s in self._slots if s.request is not None),
                waiting=len(self._waiting),
                steps=self._steps,
                batched_tokens=self._batched,
                last_batch_sequences=self._last_batch,
                generated_tokens=self._generated,
                prompt_tokens=self._prompt_total,
                reused_prompt_tokens=self._reused,
                copied_prefixes=self._copies,
                restored_prefixes=self._restores,
                saved_prefixes=len(self._saved),
                saved_prefix_bytes=self._saved_bytes,
            )

    def _generate(
        self, messages: list[ChatMessage], params: GenerationParams
    ) -> Generator[str, None, Usage]:
        asked = time.perf_counter()
        self._require_llm()
        tokens = self.prompt_tokens(messages)
        room = self._slot_ctx - len(tokens)
        if room < 1:
            raise ModelError(
                f"the prompt has {len(tokens)} tokens but the context holds {self._slot_ctx}; "
                "send less context or raise chat.n_ctx (APPLIANCE_CHAT__N_CTX)"
            )
        seed = params.seed if params.seed is not None else self._seed
        request = _Request(
            tokens=tokens,
            budget=min(params.max_tokens, room),
            params=params,
            stops=(*self._stops, *params.stop),
            seed=seed if seed is not None else self._llama_cpp.LLAMA_DEFAULT_SEED,
            submitted=asked,
        )
        with self._cond:
            if self._stopping:
                raise ModelError(f"the chat model {self._path.name} is closed")
            self._waiting.append(request)
            self._cond.notify_all()
        try:
            while True:
                item = request.out.get()
                if isinstance(item, str):
                    yield item
                elif isinstance(item, Usage):
                    return item
                else:
                    raise item
        finally:
            if not request.done:
                with self._cond:
                    # Leaves the line, or its slot at the scheduler's next step.
                    request.cancelled = True
                    if request in self._waiting:
                        self._waiting.remove(request)
                        request.done = True
                    self._cond.notify_all()

    def _close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        closed = ModelError(f"the chat model {self._path.name} was closed while answering")
        with self._cond:
            for slot in self._slots:
                if slot.request is not None:
                    self._finish(slot, error=closed)
            while self._waiting:
                request = self._waiting.popleft()
                request.done = True
                request.out.put(closed)
        self._free_context()
        self._saved.clear()
        self._saved_bytes = 0
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def _free_context(self) -> None:
        llama_cpp = getattr(self, "_llama_cpp", None)
        if llama_cpp is None:
            return
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None

    # --- the scheduler thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._schedule():
                self._step()
        except BaseException as exc:  # fail every stream rather than leave them hanging
            log.exception("the batching scheduler of %s failed", self._path.name)
            error = ModelError(f"the chat model {self._path.name} failed: {exc}")
            with self._cond:
                self._stopping = True
                for slot in self._slots:
                    if slot.request is not None:
                        self._finish(slot, error=error)
                while self._waiting:
                    request = self._waiting.popleft()
                    request.done = True
                    request.out.put(error)

    def _schedule(self) -> bool:
        """Drop cancelled requests, admit waiting ones into free slots; wait while idle.
        False once the model is closing."""
        with self._cond:
            while True:
                if self._stopping:
                    return False
                for slot in self._slots:
                    if slot.request is not None and slot.request.cancelled:
                        self._finish(slot, cancelled=True)
                while self._waiting:
                    free = [s for s in self._slots if s.request is None]
                    if not free:
                        break
                    self._admit(self._waiting.popleft(), free)
                if any(s.request is not None for s in self._slots):
                    return True
                self._cond.wait()

    def _admit(self, request: _Request, free: list[_Slot]) -> None:
        llama_cpp = self._llama_cpp
        tokens = request.tokens
        # The free slot with the longest cached prefix; when none shares much, the one idle
        # longest (an empty one first), so that a valuable cache is not trimmed for a few tokens.
        slot = max(free, key=lambda s: (_common_prefix(s.cached, tokens), -s.released))
        reuse = _common_prefix(slot.cached, tokens)
        if reuse <= MIN_COPY_GAIN:
            slot = min(free, key=lambda s: (s.released, len(s.cached)))
            reuse = _common_prefix(slot.cached, tokens)
        donor = max(
            (s for s in self._slots if s is not slot),
            key=lambda s: _common_prefix(s.cached, tokens),
            default=None,
        )
        shared = _common_prefix(donor.cached, tokens) if donor is not None else 0
        saved_key, kept = self._best_saved(tokens)
        from_saved = kept > max(reuse, shared) + MIN_COPY_GAIN
        from_donor = not from_saved and shared > reuse + MIN_COPY_GAIN
        entry = self._saved.pop(saved_key) if from_saved else None
        if entry is not None:
            self._saved_bytes -= entry.size
        if len(slot.cached) - (0 if from_saved or from_donor else reuse) > MIN_COPY_GAIN:
            self._save(slot)  # what this slot holds beyond the prefix it keeps would be lost
        if entry is not None:
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
            restored = llama_cpp.llama_state_seq_set_data(
                self._ctx, entry.data, entry.size, slot.seq
            )
            slot.cached = list(entry.tokens) if restored else []
            reuse = kept if restored else 0
            self._restores += bool(restored)
        elif from_donor:
            assert donor is not None
            # Another stream: the whole buffer is copied at the next decode, then trimmed.
            llama_cpp.llama_memory_seq_cp(self._memory, donor.seq, slot.seq, -1, -1)
            slot.cached = list(donor.cached)
            reuse = shared
            self._copies += 1
        # The last prompt token is always decoded: its logits give the first answer token.
        reuse = min(reuse, len(tokens) - 1)
        if not llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, reuse, -1):
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
            reuse = 0
        slot.cached = tokens[:reuse]
        slot.fed = reuse
        slot.request = request
        slot.sampler = self._sampler(request)
        slot.next_token = None
        slot.queued_s = time.perf_counter() - request.submitted
        slot.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        slot.pending, slot.at_start = "", True
        slot.produced = slot.sampled = 0
        slot.first = slot.last = None
        self._prompt_total += len(tokens)
        self._reused += reuse

    def _best_saved(self, tokens: Sequence[int]) -> tuple[int, int]:
        """The saved cache sharing the longest prefix with ``tokens``: (its key, the length)."""
        best, length = -1, 0
        for key, entry in self._saved.items():
            n = _common_prefix(entry.tokens, tokens)
            if n > length:
                best, length = key, n
        return best, length

    def _save(self, slot: _Slot) -> None:
        """Keep ``slot``'s KV cache in host memory (least recently saved out first); a saved
        cache that this one extends is dropped."""
        if self._saved_limit <= 0 or not slot.cached:
            return
        llama_cpp = self._llama_cpp
        size = int(llama_cpp.llama_state_seq_get_size(self._ctx, slot.seq))
        if not size or size > self._saved_limit:
            return
        data = (ctypes.c_uint8 * size)()
        if int(llama_cpp.llama_state_seq_get_data(self._ctx, data, size, slot.seq)) != size:
            return
        for key in [k for k, e in self._saved.items() if _is_prefix(e.tokens, slot.cached)]:
            self._saved_bytes -= self._saved.pop(key).size
        self._saved_ids += 1
        self._saved[self._saved_ids] = _Saved(list(slot.cached), data, size)
        self._saved_bytes += size
        while self._saved_bytes > self._saved_limit:
            _key, dropped = self._saved.popitem(last=False)
            self._saved_bytes -= dropped.size

    def _sampler(self, request: _Request) -> Any:
        """Llama.generate's chain: repetition penalties, then greedy or top-k, typical, top-p,
        min-p, temperature and a seeded draw."""
        llama_cpp = self._llama_cpp
        params = request.params
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        add(
            chain,
            llama_cpp.llama_sampler_init_penalties(
                self._n_vocab, _PENALTY_LAST_N, params.repeat_penalty, 0.0, 0.0
            ),
        )
        if params.temperature == 0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            add(chain, llama_cpp.llama_sampler_init_top_k(_TOP_K))
            add(chain, llama_cpp.llama_sampler_init_typical(_TYPICAL_P, 1))
            add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            add(chain, llama_cpp.llama_sampler_init_min_p(_MIN_P, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
            add(chain, llama_cpp.llama_sampler_init_dist(request.seed))
        return chain

    def _step(self) -> None:
        """One decode: a token for every decoding slot, then prompt chunks; then sampling."""
        llama_cpp = self._llama_cpp
        batch = self._batch
        n = 0
        fed: list[tuple[_Slot, int]] = []

        def add(token: int, pos: int, seq: int, logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = pos
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = seq
            batch.logits[n] = logits
            n += 1

        active = [s for s in self._slots if s.request is not None]
        for slot in active:
            slot.out_index = -1
            if slot.next_token is not None:
                slot.out_index = n
                add(slot.next_token, len(slot.cached), slot.seq, True)
        room = self._chunk
        for slot in sorted(active, key=_arrival):
            request = slot.request
            assert request is not None
            if room == 0 or slot.fed >= len(request.tokens):
                continue
            take = min(room, len(request.tokens) - slot.fed)
            for k in range(take):
                pos = slot.fed + k
                last = pos == len(request.tokens) - 1
                if last:
                    slot.out_index = n
                add(request.tokens[pos], pos, slot.seq, last)
            fed.append((slot, take))
            room -= take
        if n == 0:
            return
        batch.n_tokens = n
        started = time.perf_counter()
        rc = llama_cpp.llama_decode(self._ctx, batch)
        if rc != 0:
            error = ModelError(f"llama.cpp failed to decode a batch of {n} tokens (code {rc})")
            with self._cond:
                for slot in active:
                    llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
                    slot.cached = []
                    self._finish(slot, error=error)
            return
        for slot in active:
            if slot.next_token is not None:
                slot.cached.append(slot.next_token)
                slot.next_token = None
        for slot, take in fed:
            assert slot.request is not None
            slot.cached.extend(slot.request.tokens[slot.fed : slot.fed + take])
            slot.fed += take
        with self._cond:
            self._steps += 1
            self._batched += n
            self._last_batch = len(active)
        for slot in active:
            if slot.out_index >= 0:
                token = llama_cpp.llama_sampler_sample(slot.sampler, self._ctx, slot.out_index)
                self._take(slot, int(token))
        if self._observers:
            info = StepInfo(
                sequences=len(active),
                tokens=n,
                prefill_tokens=sum(take for _, take in fed),
                seconds=time.perf_counter() - started,
            )
            for observer in list(self._observers):
                observer(info)

    def _take(self, slot: _Slot, token: int) -> None:
        """A sampled token: text to the stream, or the end of the answer."""
        request = slot.request
        assert request is not None
        now = time.perf_counter()
        slot.last = now
        slot.first = slot.first or now
        slot.sampled += 1
        if self._llama_cpp.llama_vocab_is_eog(self._vocab, token):
            with self._cond:
                self._finish(slot, finish="stop")
            return
        slot.produced += 1
        with self._cond:
            self._generated += 1
        slot.pending += slot.decoder.decode(self._piece(token))
        if slot.at_start:  # the answer starts at its first non-blank character
            slot.pending = slot.pending.lstrip()
            slot.at_start = not slot.pending
        ready, slot.pending, stopped = split_at_stop(slot.pending, request.stops)
        if ready:
            request.out.put(ready)
        if stopped or slot.produced >= request.budget:
            with self._cond:
                self._finish(slot, finish="stop" if stopped else "length", stopped=stopped)
            return
        slot.next_token = token

    def _piece(self, token: int) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        size = self._llama_cpp.llama_token_to_piece(self._vocab, token, buffer, 64, 0, False)
        if size < 0:
            buffer = ctypes.create_string_buffer(-size)
            size = self._llama_cpp.llama_token_to_piece(self._vocab, token, buffer, -size, 0, False)
        return buffer.raw[:size]

    def _finish(
        self,
        slot: _Slot,
        *,
        finish: str = "length",
        stopped: bool = False,
        cancelled: bool = False,
        error: BaseException | None = None,
    ) -> None:
        """The request leaves its slot (called with the condition held); the slot keeps its
        cache for the next request's prefix."""
        request = slot.request
        assert request is not None
        if error is not None:
            request.out.put(error)
        elif not cancelled:
            if not stopped:
                rest = slot.pending + slot.decoder.decode(b"", final=True)
                ready, _, _ = split_at_stop(rest, request.stops)
                if ready:
                    request.out.put(ready)
            request.out.put(
                Usage(
                    model=self.name,
                    prompt_tokens=len(request.tokens),
                    completion_tokens=slot.produced,
                    finish_reason=finish,
                    tokens_per_s=decode_rate(slot.sampled, slot.first, slot.last),
                    queued_s=slot.queued_s,
                )
            )
        request.done = True
        if slot.sampler is not None:
            self._llama_cpp.llama_sampler_free(slot.sampler)
            slot.sampler = None
        slot.request = None
        slot.next_token = None
        slot.released = time.perf_counter()
        self._cond.notify_all()


def _arrival(slot: _Slot) -> float:
    # Prompt chunks go to the oldest request first, so every prompt's wait is bounded.
    return slot.request.submitted if slot.request is not None else 0.0
