"""The line in front of the chat model: places told in order, the turn handed on, the line left
when a waiting request goes away; and two real questions at once, the second told its place."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.core.protocols import ChatStream, Generation
from appliance.core.settings import load_settings
from appliance.turnstile import FairQueue, Turnstile, Unqueued

TIMEOUT = 120.0


class Pieces:
    """A finished-on-demand ChatStream of fixed pieces (the seam: the turnstile only hands the
    stream on; real generation is covered by the real-model test below)."""

    def __init__(self, *pieces: str) -> None:
        self._pieces = iter(pieces)
        self.closed = False

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    @property
    def stats(self) -> Generation | None:
        return None

    @property
    def text(self) -> str:
        return ""

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> Pieces:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def take_turn(turnstile: Turnstile, stream: ChatStream) -> tuple[list[dict[str, Any]], ChatStream]:
    """Run the wait to its end in this thread: (queue events, the stream holding the turn)."""
    events: list[dict[str, Any]] = []
    waiting = turnstile.wait(stream)
    while True:
        try:
            events.append(next(waiting))
        except StopIteration as done:
            return events, done.value


def test_the_first_comes_in_at_once_without_queue_events() -> None:
    turnstile = Turnstile()
    events, turn = take_turn(turnstile, Pieces("a", "b"))
    assert events == []
    assert turnstile.length == 1
    assert list(turn) == ["a", "b"]
    assert turnstile.length == 0  # exhausting the stream gave the turn back


def test_waiting_requests_are_told_their_place_as_they_move_up() -> None:
    turnstile = Turnstile()
    _, first = take_turn(turnstile, Pieces("x"))
    second = turnstile.wait(Pieces("y"))
    third = turnstile.wait(Pieces("z"))
    assert next(second) == {"type": "queue", "position": 1}
    assert next(third) == {"type": "queue", "position": 2}

    told: list[dict[str, Any]] = []
    moved = threading.Event()

    def third_waits() -> None:
        told.append(next(third))  # blocks until someone ahead leaves
        moved.set()

    waiter = threading.Thread(target=third_waits)
    waiter.start()
    first.close()  # the first answer is done: everyone moves up by one
    assert moved.wait(TIMEOUT)
    waiter.join()
    assert told == [{"type": "queue", "position": 1}]
    assert next(second) == {"type": "queue", "position": 0}  # its turn: generation starts
    with pytest.raises(StopIteration) as done:
        next(second)
    turn = done.value.value
    with turn:
        assert list(turn) == ["y"]
    assert next(third) == {"type": "queue", "position": 0}
    assert turnstile.length == 1


def test_a_request_that_goes_away_while_waiting_leaves_the_line() -> None:
    turnstile = Turnstile()
    _, first = take_turn(turnstile, Pieces("x"))
    gone = turnstile.wait(Pieces("y"))
    assert next(gone) == {"type": "queue", "position": 1}
    gone.close()  # the client disconnected
    later = turnstile.wait(Pieces("z"))
    assert next(later) == {"type": "queue", "position": 1}  # not 2: nobody phantom ahead
    first.close()
    assert next(later) == {"type": "queue", "position": 0}


def test_closing_the_turn_closes_the_model_stream() -> None:
    turnstile = Turnstile()
    pieces = Pieces("a", "b")
    _, turn = take_turn(turnstile, pieces)
    assert next(turn) == "a"
    turn.close()
    assert pieces.closed
    assert turnstile.length == 0


def test_unqueued_hands_the_stream_back_at_once() -> None:
    pieces = Pieces("a")
    events, stream = take_turn(Unqueued(), pieces)  # type: ignore[arg-type]
    assert events == []
    assert stream is pieces


# --- two real questions at once ----------------------------------------------------------------


@pytest.fixture
def answerer(tmp_path: Path, real_embedder):  # type: ignore[no-untyped-def]
    """The real wiring (llama.cpp default model, so a Turnstile) over two small documents."""
    from appliance.wiring import build_answerer, open_ingestion

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "leave.md").write_text(
        "# Annual leave\n\nEvery employee receives 27 days of paid annual leave per year.\n"
    )
    (docs / "hours.md").write_text(
        "# Office hours\n\nThe office opens at 8 am and closes at 6 pm on weekdays.\n"
    )
    settings = load_settings(
        env={},
        overrides={"data_dir": str(tmp_path / "data"), "chat": {"n_threads": 2, "parallel": 1}},
    )
    ingestion = open_ingestion(settings, docs, role="tests", embedder=real_embedder)
    ingestion.indexer.reconcile()
    yield build_answerer(settings, ingestion)
    ingestion.close()


def test_a_second_question_waits_behind_the_first_and_is_told_so(answerer: Any) -> None:
    assert isinstance(answerer.queue, FairQueue)
    assert answerer.queue.slots == 1  # chat.parallel: the serial engine
    first = answerer.stream("How many days of paid annual leave does an employee get?")
    # Hold the first question mid-generation: it has the model's turn until it is finished.
    for event in first:
        if event["type"] == "token":
            break
    else:
        pytest.fail("the first question produced no tokens")

    second: list[dict[str, Any]] = []
    told = threading.Event()

    def ask_second() -> None:
        for event in answerer.stream("When does the office open on weekdays?"):
            second.append(event)
            if event["type"] == "queue":
                told.set()

    thread = threading.Thread(target=ask_second)
    thread.start()
    try:
        assert told.wait(TIMEOUT), "the second question was not told its place"
        assert {e["position"] for e in second if e["type"] == "queue"} == {1}
        assert not [e for e in second if e["type"] == "token"]  # still waiting, no generation
    finally:
        rest = list(first)  # the first one finishes: the second gets the turn
        thread.join(TIMEOUT)
    assert rest[-1]["type"] == "answer"
    assert "27" in rest[-1]["answer"].answer
    kinds = [e["type"] for e in second]
    queue = [e["position"] for e in second if e["type"] == "queue"]
    moves = [p for i, p in enumerate(queue) if i == 0 or p != queue[i - 1]]
    assert moves == [1, 0]  # repeats of 1 are the heartbeat while the first one finishes
    assert kinds.index("token") > max(i for i, k in enumerate(kinds) if k == "queue")
    assert kinds[-1] == "answer"
    assert "8" in second[-1]["answer"].answer
    assert answerer.queue.length == 0


def test_a_long_wait_repeats_the_place_so_a_gone_client_is_noticed() -> None:
    turnstile = Turnstile(heartbeat_s=0.05)
    _, first = take_turn(turnstile, Pieces("x"))
    waiting = turnstile.wait(Pieces("y"))
    assert [next(waiting) for _ in range(3)] == [{"type": "queue", "position": 1}] * 3
    waiting.close()  # writing one of them failed: the request leaves the line
    assert turnstile.length == 1
    first.close()
    assert turnstile.length == 0
