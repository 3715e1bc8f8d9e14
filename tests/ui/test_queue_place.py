"""The place in the queue outside the UI: ``appliance ask --stream`` against the running core
service prints "waiting: N ahead" on stderr while another question has the model."""

from __future__ import annotations

import threading

import pytest

from appliance import cli
from tests.ui.conftest import Core
from tests.ui.test_app import LEAVE


def test_ask_stream_prints_its_place_while_the_model_is_busy(
    core: Core, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("APPLIANCE_DATA_DIR", str(core.data_dir))
    answerer = core.service.answerer
    monkeypatch.setattr(answerer.queue, "slots", 1)  # whatever the engine decodes together
    busy = answerer.stream(LEAVE)
    assert next(e for e in busy if e["type"] == "token")  # another question holds the model

    def finish_when_queued() -> None:
        for _ in range(600):
            if answerer.queue.ready >= 1:  # its retrieval done, it waits for the model
                break
            threading.Event().wait(0.1)
        list(busy)

    releaser = threading.Thread(target=finish_when_queued)
    releaser.start()
    try:
        assert cli.main(["ask", "When does the office open?", "--stream"]) == 0
    finally:
        releaser.join(120)
    out, err = capsys.readouterr()
    assert "waiting: 1 ahead" in err.splitlines()
    assert "waiting" not in out
    assert "8" in out
