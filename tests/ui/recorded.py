"""A recorded answer stream at the UI/API seam, for answers the real default model cannot give
on demand (a quoted answer, a dropped sentence with a figure the documents do not state).

``RecordedAskClient`` is a real ``ServiceClient`` of the running test service (sign-in,
conversations, downloads all go to it) whose ``stream("/ask")`` replays recorded events
instead. The events follow the answer stream of ``appliance.answering`` (sources first, queue
positions, tokens, claims, the final answer); the passage texts are the test documents'
(``tests/ui/conftest.DOCUMENTS``), the spans their real character offsets.

``recorded_chat.py`` beside this file is the Streamlit script that renders the chat page with
it: ``AppTest.from_file(RECORDED_CHAT)`` with ``session_state[RECORDING]`` set to the events
and ``session_state[CLIENT]`` to a signed-in client.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.api import ServiceClient

RECORDED_CHAT = Path(__file__).with_name("recorded_chat.py")
RECORDING = "recorded.events"
CLIENT = "recorded.client"

CONTRACT = (
    "Supply contract\n\nThe supply contract with Acme Ltd runs for 36 months and renews "
    "automatically unless cancelled with 90 days notice."
)
QUOTE = CONTRACT.split("\n\n")[1]
INVENTED = "The contract is worth $4.98 billion [1]."
QUESTION = "How long does the supply contract with Acme run, and what is it worth?"


class RecordedAskClient(ServiceClient):
    """The test service for everything but ``/ask``, whose stream is the recording."""

    def __init__(self, client: ServiceClient, events: list[dict[str, Any]]) -> None:
        super().__init__(client.host, client.port, client.token, client.timeout, client.session)
        self.events = events
        self.asked: list[dict[str, Any]] = []

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if path != "/ask":
            yield from super().stream(path, body)
            return
        self.asked.append(body)
        yield from self.events


def span(text: str, part: str) -> list[int]:
    start = text.index(part)
    return [start, start + len(part)]


def contract_source(spans: list[list[int]]) -> dict[str, Any]:
    return {
        "number": 1,
        "path": "legal/contract.md",
        "page": None,
        "heading": "Supply contract",
        "text": CONTRACT,
        "score": 0.71,
        "start": 0,
        "end": len(CONTRACT),
        "doc_hash": "recorded",
        "spans": spans,
    }


def quoted_answer_events() -> list[dict[str, Any]]:
    """The model invents a figure; the verifier drops that sentence and nothing supported is
    left, so the answer quotes the passage. The question waited behind one other."""
    best = span(CONTRACT, QUOTE)
    invented = {
        "text": INVENTED,
        "supported": False,
        "source": None,
        "start": None,
        "end": None,
        "reason": "figure $4.98 billion not in passage [1]",
    }
    quote = {
        "text": QUOTE,
        "supported": True,
        "source": 1,
        "start": best[0],
        "end": best[1],
        "reason": "quoted",
    }
    answer = {
        "question": QUESTION,
        "answer": QUOTE + " [1]",
        "sources": [contract_source([best])],
        "abstained": False,
        "query": QUESTION,
        "retrieved": [],
        "relevance": 0.71,
        "model": "recorded",
        "timings": {},
        "redacted": False,
        "claims": [quote],
        "unsupported_claims": [invented],
        "mode": "quoted",
    }
    return [
        {"type": "sources", "sources": [contract_source([best])]},
        {"type": "queue", "position": 1},
        {"type": "queue", "position": 0},
        {"type": "token", "text": "The contract is worth "},
        {"type": "token", "text": "$4.98 billion [1]."},
        {"type": "claim", "claim": invented},
        {"type": "answer", "answer": answer, "conversation": None, "message": None},
    ]


def evidence_only_events() -> list[dict[str, Any]]:
    """The sources and a place in the queue, then the stream ends: the model never answered
    (e.g. the service stopped). What was shown before the model is all there is."""
    return quoted_answer_events()[:2]
