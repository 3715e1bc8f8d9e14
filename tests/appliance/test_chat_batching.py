"""The continuous-batching engine with the real packaged SmolLM2 through llama.cpp.

The serial ``LlamaCppChatModel`` is the reference: with greedy decoding (and with a seed), the
batched engine must write the same answers whether requests run alone, together, or join
while others decode. Nothing here is timed; where a test needs requests to overlap, a step
observer (the engine's seam for metrics) holds the scheduler until the overlap is set up.

llama.cpp's CPU kernels are not batch-invariant: a step of several sequences computes the
output layer with another kernel than a step of one (sgemm from two rows up), and attends over
the longest sequence's cache length, so logits move by rounding with the batch's make-up (its
own server behaves the same). A greedy answer can therefore flip where two tokens tie within
rounding; the answers compared here are short and grounded, far from such ties.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from appliance.chat.batching import (
    BatchedLlamaCppChatModel,
    StepInfo,
    auto_parallel,
)
from appliance.chat.factory import llamacpp_chat_model
from appliance.chat.llamacpp import LlamaCppChatModel
from appliance.core.chat_settings import ChatSettings, default_chat_model_path
from appliance.core.errors import ModelError
from appliance.core.protocols import ChatMessage, ChatModel, Generation, GenerationParams

pytestmark = pytest.mark.slow  # real decoding of several answers: tens of seconds on 2 cores

CONTEXT = (
    "Context:\n[1] Backups run every night at 02:00 and are kept for 35 days; a restore test "
    "is carried out each quarter.\n\n[2] The appliance retains audit logs for 7 years under "
    "policy AP-12; only the compliance team may export them.\n\nQuestion: "
)
QUESTIONS = [
    "How long are audit logs retained?",
    "Who may export the audit logs?",
    "When do backups run?",
    "How often is a restore tested?",
]
GREEDY = GenerationParams(max_tokens=8, temperature=0.0)
WAIT_S = 300  # a bound on waits for threads, so a bug fails the test instead of hanging it


def grounded(question: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=CONTEXT + question)]


@pytest.fixture(scope="module")
def serial() -> Iterator[LlamaCppChatModel]:
    with LlamaCppChatModel(default_chat_model_path(), n_ctx=2048, n_threads=1) as model:
        yield model


@pytest.fixture(scope="module")
def reference(serial: LlamaCppChatModel) -> dict[str, tuple[str, Generation]]:
    """Each question answered alone by today's serial engine."""
    return {q: serial.complete(grounded(q), GREEDY) for q in QUESTIONS}


@pytest.fixture(scope="module")
def batched() -> Iterator[BatchedLlamaCppChatModel]:
    with BatchedLlamaCppChatModel(
        default_chat_model_path(), slots=4, n_ctx=2048, n_threads=1, prefill_chunk=16
    ) as model:
        yield model


def in_threads(*calls: Callable[[], object]) -> list[object]:
    results: list[object] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT_S)
    assert not any(t.is_alive() for t in threads), "a stream hung"
    assert not errors, errors
    return results


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "the engine never reached the expected state"
        time.sleep(0.01)


class Gate:
    """A step observer that holds the scheduler after the first step where ``when`` holds,
    until ``release``; it records every step."""

    def __init__(self, when: Callable[[StepInfo], bool]) -> None:
        self.when = when
        self.steps: list[StepInfo] = []
        self.holding = threading.Event()
        self._go = threading.Event()
        self._armed = True

    def __call__(self, info: StepInfo) -> None:
        self.steps.append(info)
        if self._armed and self.when(info):
            self._armed = False
            self.holding.set()
            self._go.wait(WAIT_S)

    def release(self) -> None:
        self._armed = False
        self._go.set()


def test_concurrent_streams_write_what_serial_greedy_decoding_writes(
    batched: BatchedLlamaCppChatModel, reference: dict[str, tuple[str, Generation]]
) -> None:
    as_protocol: ChatModel = batched  # it satisfies the interface (checked by mypy)
    assert as_protocol.context_length == 2048
    answers = in_threads(*(lambda q=q: batched.complete(grounded(q), GREEDY) for q in QUESTIONS))
    for question, (text, stats) in zip(QUESTIONS, answers, strict=True):
        want_text, want = reference[question]
        assert text == want_text, question
        assert text
        assert stats.completion_tokens == want.completion_tokens
        assert stats.prompt_tokens == want.prompt_tokens
        assert stats.finish_reason == want.finish_reason
        assert stats.model == batched.name
        assert stats.tokens_per_s > 0
        assert 0 < stats.ttft_s <= stats.total_s
    assert batched.engine_stats().active == 0


def test_a_request_joins_while_another_decodes(
    batched: BatchedLlamaCppChatModel, reference: dict[str, tuple[str, Generation]]
) -> None:
    first, second = QUESTIONS[0], QUESTIONS[2]
    # Hold the scheduler once the first request decodes alone, past its prompt.
    gate = Gate(lambda info: info.sequences == 1 and info.prefill_tokens == 0)
    batched.add_step_observer(gate)
    try:
        results: dict[str, str] = {}
        a = threading.Thread(
            target=lambda: results.__setitem__("a", batched.complete(grounded(first), GREEDY)[0])
        )
        a.start()
        assert gate.holding.wait(WAIT_S)
        b = threading.Thread(
            target=lambda: results.__setitem__("b", batched.complete(grounded(second), GREEDY)[0])
        )
        b.start()
        wait_until(lambda: batched.engine_stats().waiting == 1)
        gate.release()
        a.join(WAIT_S)
        b.join(WAIT_S)
    finally:
        gate.release()
        batched._observers.remove(gate)
    held = next(i for i, s in enumerate(gate.steps) if s.sequences == 1 and not s.prefill_tokens)
    # The second joined at the next step, its prompt read beside the first's decoding.
    joined = gate.steps[held + 1]
    assert joined.sequences == 2
    assert joined.prefill_tokens > 0
    assert results == {"a": reference[first][0], "b": reference[second][0]}


def test_a_closed_stream_frees_its_slot(reference: dict[str, tuple[str, Generation]]) -> None:
    with BatchedLlamaCppChatModel(default_chat_model_path(), slots=1, n_ctx=1024, n_threads=1) as m:
        stream = m.stream(grounded(QUESTIONS[0]), GenerationParams(max_tokens=200))
        assert next(stream)
        assert m.engine_stats().active == 1
        stream.close()  # the client went away
        wait_until(lambda: m.engine_stats().active == 0)
        assert stream.stats is None
        produced = m.engine_stats().generated_tokens
        assert produced < 200
        # The one slot serves the next request.
        text, stats = m.complete(grounded(QUESTIONS[1]), GREEDY)
        assert text == reference[QUESTIONS[1]][0]
        assert stats.queued_s < WAIT_S
        # A stream closed before its first piece never takes a slot.
        m.stream(grounded(QUESTIONS[2])).close()
        assert m.engine_stats().waiting == 0


def test_stop_strings_and_max_tokens_end_answers_as_in_the_serial_engine(
    batched: BatchedLlamaCppChatModel, serial: LlamaCppChatModel
) -> None:
    full, _ = serial.complete(grounded(QUESTIONS[0]), GREEDY)
    word = full.split()[2]
    stop = GenerationParams(max_tokens=16, temperature=0.0, stop=(word,))
    short = GenerationParams(max_tokens=3, temperature=0.0)
    for params in (stop, short):
        want_text, want = serial.complete(grounded(QUESTIONS[0]), params)
        text, stats = batched.complete(grounded(QUESTIONS[0]), params)
        assert text == want_text
        assert (stats.finish_reason, stats.completion_tokens) == (
            want.finish_reason,
            want.completion_tokens,
        )
    assert word not in batched.complete(grounded(QUESTIONS[0]), stop)[0]
    assert batched.complete(grounded(QUESTIONS[0]), short)[1].finish_reason == "length"


def test_a_seed_samples_what_the_serial_engine_samples() -> None:
    # Fresh models on both sides: how the prompt's last token was decoded (in a batch of the
    # prompt, or alone after a cached prefix) moves its logits by rounding, which is enough to
    # change a draw at temperature 1. The serial engine reuses its cached prefix the same way.
    hot = GenerationParams(max_tokens=12, temperature=1.0, seed=1234)
    path = default_chat_model_path()
    with LlamaCppChatModel(path, n_ctx=1024, n_threads=1) as serial:
        want = [serial.complete(grounded(QUESTIONS[1]), hot)[0] for _ in "ab"]
    with BatchedLlamaCppChatModel(path, slots=2, n_ctx=1024, n_threads=1) as batched:
        got = [batched.complete(grounded(QUESTIONS[1]), hot)[0] for _ in "ab"]
    assert got == want


def test_prefixes_are_reused_within_a_slot_and_copied_from_a_busy_one(
    reference: dict[str, tuple[str, Generation]],
) -> None:
    path = default_chat_model_path()
    with BatchedLlamaCppChatModel(path, slots=2, n_ctx=1024, n_threads=1) as model:
        first, _ = model.complete(grounded(QUESTIONS[0]), GREEDY)
        cold = model.engine_stats()
        assert cold.reused_prompt_tokens == 0
        # The same passages, another question: the slot's cache holds the shared prefix.
        second, _ = model.complete(grounded(QUESTIONS[1]), GREEDY)
        warm = model.engine_stats()
        shared = warm.reused_prompt_tokens
        assert shared > len(CONTEXT) // 8  # most of the context's tokens
        assert warm.copied_prefixes == 0
        # While a request decodes on the slot with that cache, another question over the same
        # passages takes the free slot and copies the busy slot's prefix into it.
        gate = Gate(lambda info: info.prefill_tokens == 0)
        model.add_step_observer(gate)
        try:
            results: dict[str, str] = {}
            asks = {"c": QUESTIONS[2], "d": QUESTIONS[3]}

            def ask(key: str) -> None:
                results[key] = model.complete(grounded(asks[key]), GREEDY)[0]

            c = threading.Thread(target=ask, args=("c",))
            c.start()
            assert gate.holding.wait(WAIT_S)
            d = threading.Thread(target=ask, args=("d",))
            d.start()
            wait_until(lambda: model.engine_stats().waiting == 1)
            gate.release()
            c.join(WAIT_S)
            d.join(WAIT_S)
        finally:
            gate.release()
        done = model.engine_stats()
    assert done.copied_prefixes == 1
    assert done.reused_prompt_tokens >= 3 * shared - 3  # the second, third and fourth
    assert [first, second, results["c"], results["d"]] == [reference[q][0] for q in QUESTIONS]


OTHER_CONTEXT = (
    "Context:\n[1] Visitors sign in at the front desk and wear a badge at all times; badges "
    "are returned when they leave.\n\nQuestion: "
)


def test_a_cache_a_slot_loses_is_saved_and_put_back_for_the_same_passages(
    reference: dict[str, tuple[str, Generation]],
) -> None:
    """One slot: other passages take it over, then a question over the first passages gets
    their KV cache back from host memory instead of reading them again, and answers alike."""
    path = default_chat_model_path()
    other = [ChatMessage(role="user", content=OTHER_CONTEXT + "Who signs visitors in?")]
    with BatchedLlamaCppChatModel(path, slots=1, n_ctx=1024, n_threads=1) as model:
        first, _ = model.complete(grounded(QUESTIONS[0]), GREEDY)
        model.complete(other, GREEDY)  # takes the only slot: the first cache is saved
        saved = model.engine_stats()
        assert saved.saved_prefixes == 1
        assert saved.saved_prefix_bytes > 0
        again, _ = model.complete(grounded(QUESTIONS[1]), GREEDY)
        done = model.engine_stats()
    assert done.restored_prefixes == 1
    assert done.reused_prompt_tokens - saved.reused_prompt_tokens > len(CONTEXT) // 8
    assert done.saved_prefixes == 1  # the visitors' cache, saved in turn
    assert [first, again] == [reference[q][0] for q in QUESTIONS[:2]]


def test_no_prefix_cache_when_none_is_allowed() -> None:
    path = default_chat_model_path()
    with BatchedLlamaCppChatModel(
        path, slots=1, n_ctx=1024, n_threads=1, prefix_cache_bytes=0
    ) as model:
        model.complete(grounded(QUESTIONS[0]), GREEDY)
        model.complete([ChatMessage(role="user", content=OTHER_CONTEXT + "Who?")], GREEDY)
        model.complete(grounded(QUESTIONS[1]), GREEDY)
        stats = model.engine_stats()
    assert stats.saved_prefixes == 0
    assert stats.restored_prefixes == 0


def test_one_thread_may_hold_several_streams(batched: BatchedLlamaCppChatModel) -> None:
    with (
        batched.stream(grounded(QUESTIONS[0]), GREEDY) as a,
        batched.stream(grounded(QUESTIONS[1]), GREEDY) as b,
    ):
        pieces_a = [next(a)]
        pieces_b = list(b)
        pieces_a += list(a)
        stats = [a.stats, b.stats]
    assert pieces_a
    assert pieces_b
    assert all(s is not None and s.completion_tokens > 0 for s in stats)
    assert batched.engine_stats().active == 0


def test_a_prompt_longer_than_a_slot_is_refused(batched: BatchedLlamaCppChatModel) -> None:
    long = [ChatMessage(role="user", content="audit " * 3000)]
    with pytest.raises(ModelError, match="APPLIANCE_CHAT__N_CTX"):
        batched.complete(long)
    assert batched.engine_stats().active == 0


def test_closing_the_model_ends_streams_in_flight() -> None:
    model = BatchedLlamaCppChatModel(default_chat_model_path(), slots=1, n_ctx=512, n_threads=1)
    stream = model.stream(grounded(QUESTIONS[0]), GenerationParams(max_tokens=200))
    assert next(stream)
    outcome: list[BaseException] = []

    def wait_in_line() -> None:
        try:
            model.complete(grounded(QUESTIONS[1]))
        except ModelError as exc:
            outcome.append(exc)

    in_line = threading.Thread(target=wait_in_line)
    in_line.start()
    wait_until(lambda: model.engine_stats().waiting == 1)
    model.close()
    in_line.join(WAIT_S)
    assert not in_line.is_alive()
    assert len(outcome) == 1
    assert "closed" in str(outcome[0])
    with pytest.raises(ModelError, match="closed"):
        list(stream)
    with pytest.raises(ModelError, match="closed"):
        model.stream(grounded(QUESTIONS[0]))


def test_chat_parallel_picks_the_engine() -> None:
    path = default_chat_model_path()
    with llamacpp_chat_model(ChatSettings(parallel=1, n_ctx=512, n_threads=1), path) as one:
        assert type(one) is LlamaCppChatModel
    with llamacpp_chat_model(ChatSettings(parallel=3, n_ctx=512, n_threads=1), path) as three:
        assert isinstance(three, BatchedLlamaCppChatModel)
        assert three.slots == 3
        assert three.context_length == 512
    with llamacpp_chat_model(ChatSettings(n_ctx=512, n_threads=1), path) as auto:
        assert isinstance(auto, BatchedLlamaCppChatModel)
        assert 1 <= auto.slots <= 8


def test_the_default_slot_count_follows_cores_and_memory() -> None:
    mib = 2**20
    assert auto_parallel(1, 64 * 1024 * mib, 100 * mib)[0] == 4
    assert auto_parallel(2, 64 * 1024 * mib, 100 * mib)[0] == 8
    assert auto_parallel(64, 64 * 1024 * mib, 100 * mib)[0] == 8
    # A quarter of 2 GiB holds five caches of 100 MiB.
    slots, why = auto_parallel(16, 2048 * mib, 100 * mib)
    assert slots == 5
    assert "100 MiB per slot" in why
    assert auto_parallel(16, 100 * mib, 1000 * mib)[0] == 1
    assert auto_parallel(2, 0, 100 * mib)[0] == 8
