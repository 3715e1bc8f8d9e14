"""The fair queue in front of the chat model: several slots, arrival order across users, a cap
per user, a place taken on arrival (retrieval runs while it is kept), 503 beyond the limit with
a Retry-After from the measured answer times, and the metrics it reports."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.core.errors import Busy
from appliance.core.protocols import ChatStream
from appliance.metrics import Metrics
from appliance.turnstile import FairQueue, Ticket
from tests.appliance.test_turnstile import Pieces


class Waiting:
    """A question waiting for a slot: its ``wait`` generator and the first place it was told."""

    def __init__(self, events: Any, told: dict[str, Any]) -> None:
        self.events = events
        self.told = told

    def __next__(self) -> dict[str, Any]:
        return next(self.events)  # type: ignore[no-any-return]


def start(queue: FairQueue, ticket: Ticket | None = None, text: str = "x") -> Any:
    """Call ``wait``: the stream holding a slot when one was free at once, else ``Waiting``."""
    events = queue.wait(Pieces(text), ticket)
    try:
        first = next(events)
    except StopIteration as done:
        return done.value
    return Waiting(events, first)


def holds_slot(result: Any) -> bool:
    return not isinstance(result, Waiting)


def finish(waiting: Waiting) -> ChatStream:
    """Run a waiting question's generator to its end (its slot must be free by now)."""
    while True:
        try:
            next(waiting)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def test_as_many_answers_run_as_there_are_slots() -> None:
    queue = FairQueue(slots=2)
    a, b = start(queue, text="a"), start(queue, text="b")
    assert holds_slot(a)
    assert holds_slot(b)
    c = start(queue, text="c")
    assert not holds_slot(c)
    assert c.told == {"type": "queue", "position": 1}
    assert (queue.running, queue.waiting, queue.length) == (2, 1, 3)
    assert list(a) == ["a"]  # exhausted: its slot goes to the next in line
    assert next(c) == {"type": "queue", "position": 0}
    with finish(c) as turn:
        assert list(turn) == ["c"]
    b.close()
    assert queue.length == 0


def test_a_users_second_question_waits_while_another_user_passes() -> None:
    queue = FairQueue(slots=2, per_user=1)
    first_of_ann = start(queue, queue.admit("ann"))
    assert holds_slot(first_of_ann)
    second_of_ann = start(queue, queue.admit("ann"))
    assert not holds_slot(second_of_ann)  # a slot is free, but ann has her one running
    bob = start(queue, queue.admit("bob"))
    assert holds_slot(bob)  # arrived later, passes ann's second question
    assert (queue.running, queue.waiting) == (2, 1)
    bob.close()
    assert queue.waiting == 1  # still capped: bob's slot is not ann's to take
    first_of_ann.close()
    finish(second_of_ann).close()
    assert queue.length == 0


def test_local_tools_are_not_capped_per_user() -> None:
    queue = FairQueue(slots=3, per_user=1)
    turns = [start(queue, queue.admit("")) for _ in range(3)]
    assert all(holds_slot(t) for t in turns)
    for t in turns:
        t.close()


def test_the_place_is_kept_from_arrival_while_retrieval_runs() -> None:
    queue = FairQueue(slots=1)
    running = start(queue)
    early = queue.admit("ann")  # arrived first, still retrieving
    late = start(queue, queue.admit("bob"))
    assert late.told == {"type": "queue", "position": 2}  # ann's question is ahead
    running.close()
    # the slot is free and ann is not ready yet: bob does not wait for her retrieval
    assert next(late) == {"type": "queue", "position": 0}
    bobs = finish(late)
    ann = start(queue, early)
    assert ann.told == {"type": "queue", "position": 1}
    bobs.close()
    finish(ann).close()
    assert queue.length == 0


def test_a_place_given_back_before_the_model_turn_frees_it() -> None:
    """An abstention (or a client gone during retrieval) closes its ticket unused."""
    queue = FairQueue(slots=1, limit=1)
    running = start(queue)
    ticket = queue.admit("ann")
    with pytest.raises(Busy):
        queue.admit("bob")
    ticket.close()
    ticket.close()  # twice is fine
    queue.admit("bob").close()
    running.close()
    assert queue.length == 0


def test_beyond_the_limit_questions_are_refused_with_a_measured_retry_after() -> None:
    now = [0.0]
    queue = FairQueue(slots=1, limit=1, clock=lambda: now[0])
    running = start(queue)
    waiting = start(queue, queue.admit("ann"))
    with pytest.raises(Busy) as refused:
        queue.admit("bob")
    assert refused.value.http_status == 503
    assert refused.value.retry_after_s == 10  # nothing timed yet: the assumed 10 s an answer
    assert "try again in 10 s" in str(refused.value)
    now[0] = 30.0
    running.close()  # held the slot 30 s
    turn = finish(waiting)
    now[0] = 60.0
    other = start(queue, queue.admit("cy"))
    with pytest.raises(Busy) as again:
        queue.admit("dee")
    assert again.value.retry_after_s == 30
    turn.close()
    finish(other).close()


def test_a_limit_of_zero_refuses_only_what_would_wait() -> None:
    queue = FairQueue(slots=2, limit=0)
    a = start(queue, queue.admit("a"))
    b = start(queue, queue.admit("b"))
    with pytest.raises(Busy):
        queue.admit("c")
    a.close()
    b.close()


def test_in_process_waits_join_past_the_limit() -> None:
    """``wait`` without a ticket (the CLI answering in-process) is never refused."""
    queue = FairQueue(slots=1, limit=0)
    running = start(queue)
    waiting = start(queue)
    assert waiting.told == {"type": "queue", "position": 1}
    running.close()
    finish(waiting).close()


def test_the_queue_reports_depth_slots_waits_and_refusals() -> None:
    metrics = Metrics()
    now = [0.0]
    queue = FairQueue(slots=1, limit=1, observer=metrics, clock=lambda: now[0])

    def value(name: str, **labels: str) -> float:
        got = metrics.registry.get_sample_value(name, labels)
        return float(got or 0.0)

    running = start(queue)
    waiting = start(queue, queue.admit("ann"))
    assert value("appliance_chat_queue_depth") == 1
    assert value("appliance_chat_active_slots") == 1
    with pytest.raises(Busy):
        queue.admit("bob")
    assert value("appliance_chat_queue_rejected_total") == 1
    now[0] = 4.0
    running.close()
    finish(waiting).close()
    assert value("appliance_chat_queue_depth") == 0
    assert value("appliance_chat_active_slots") == 0
    assert value("appliance_chat_queue_wait_seconds_count") == 2
    assert value("appliance_chat_queue_wait_seconds_sum") == 4.0
    assert value("appliance_chat_queue_wait_seconds_bucket", le="5.0") == 2


def test_decode_steps_are_counted_for_batch_size_and_throughput() -> None:
    metrics = Metrics()
    metrics.set_slots(4)
    metrics.observe_decode_step(4, 4)
    metrics.observe_decode_step(1, 1)
    metrics.observe_decode_step(0, 0)  # an idle step says nothing
    get = metrics.registry.get_sample_value
    assert get("appliance_chat_slots", {}) == 4
    assert get("appliance_chat_decode_batch_size_count", {}) == 2
    assert get("appliance_chat_decode_batch_size_sum", {}) == 5
    assert get("appliance_chat_decode_tokens_total", {}) == 5


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="slots >= 1"):
        FairQueue(slots=0)
