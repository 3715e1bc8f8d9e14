"""A full queue in front of the chat model: the API answers 503 with ``Retry-After`` (before
any work on the question), ``ServiceClient`` keeps the wait, the chat page says "busy, try
again in N s" instead of hanging, and the next question after the line moves is answered."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest

from appliance.core.errors import ServiceError
from tests.ui.conftest import STAFF, Core
from tests.ui.test_app import LEAVE, MakeApp, sign_in


@pytest.fixture
def full(core: Core, monkeypatch: pytest.MonkeyPatch) -> Iterator[Core]:
    """The one slot held by another question mid-answer, and no room to wait."""
    queue = core.service.answerer.queue
    monkeypatch.setattr(queue, "slots", 1)  # whatever the engine decodes together
    monkeypatch.setattr(queue, "limit", 0)
    busy = core.service.answerer.stream(LEAVE)
    assert next(e for e in busy if e["type"] == "token")
    yield core
    busy.close()
    assert queue.length == 0


def test_a_full_queue_answers_503_with_retry_after(full: Core) -> None:
    me = full.session(*STAFF)
    conn = http.client.HTTPConnection(me.host, me.port, timeout=60)
    headers = {
        "Authorization": f"Bearer {me.token}",
        "X-Appliance-Session": str(me.session),
        "Content-Type": "application/json",
    }
    conn.request("POST", "/ask", json.dumps({"question": LEAVE, "stream": True}), headers)
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 503
    wait = int(response.getheader("Retry-After") or 0)
    assert wait >= 1
    assert body["retry_after_s"] == wait
    assert "busy" in body["error"]
    with pytest.raises(ServiceError) as refused:
        list(me.stream("/ask", {"question": LEAVE, "stream": True}))
    assert refused.value.status == 503
    assert refused.value.retry_after_s == wait
    with pytest.raises(ServiceError) as plain:
        me.call("POST", "/ask", {"question": LEAVE})
    assert plain.value.status == 503
    assert full.service.answerer.queue.waiting == 0  # nothing was taken in


def test_the_chat_page_says_busy_and_when_to_try_again(app: MakeApp, full: Core) -> None:
    at = sign_in(app(), STAFF)
    at.chat_input[0].set_value(LEAVE).run()
    assert not at.exception
    warnings = [str(w.value) for w in at.warning]
    assert any("busy" in w and "try again in" in w for w in warnings), warnings
    assert not at.error
    assert at.session_state["chat.messages"] == []  # nothing half-answered is kept
