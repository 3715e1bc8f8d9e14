"""The scale-out path against a real OpenAI-compatible server: llama-cpp-python's own server
(``python -m llama_cpp.server``, the ``llama-cpp-python[server]`` extra) on loopback with the
default tiny GGUF, answered through ``chat.backend: openai``, with the core service's fair queue
still in front of it (places told, 503 beyond the limit).

Ollama has no server package on the registries this machine reaches: its backend is tested
against a replay of its wire format only (``test_chat_models.py``)."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.core.errors import Busy
from appliance.core.settings import load_settings

pytestmark = [pytest.mark.slow, pytest.mark.integration]

LEAVE = "How many days of paid annual leave does an employee get?"
HOURS = "When does the office open on weekdays?"
TIMEOUT = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m llama_cpp.server`` on a loopback port: its base URL once it answers."""
    if importlib.util.find_spec("sse_starlette") is None:
        pytest.skip("llama-cpp-python's server extra is absent: pip install -e '.[dev]'")
    from appliance.core.chat_settings import default_chat_model_path

    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(default_chat_model_path()),
        "--model_alias",
        "smollm2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        "--n_threads",
        "2",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited: {log.read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama_cpp.server did not answer within 120 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def answerer(
    server: str, tmp_path_factory: pytest.TempPathFactory, real_embedder: Any
) -> Iterator[Any]:
    from appliance.wiring import build_answerer, open_ingestion

    root = tmp_path_factory.mktemp("openai-answers")
    docs = root / "docs"
    docs.mkdir()
    (docs / "leave.md").write_text(
        "# Annual leave\n\nEvery employee receives 27 days of paid annual leave per year.\n"
    )
    (docs / "hours.md").write_text(
        "# Office hours\n\nThe office opens at 8 am and closes at 6 pm on weekdays.\n"
    )
    settings = load_settings(
        env={},
        overrides={
            "data_dir": str(root / "data"),
            "chat": {
                "backend": "openai",
                "url": server,
                "model": "smollm2",
                "n_ctx": 2048,
                "parallel": 1,  # llama_cpp.server serves one request at a time
            },
            "service": {"queue_limit": 1},
        },
    )
    ingestion = open_ingestion(settings, docs, role="tests", embedder=real_embedder)
    ingestion.indexer.reconcile()
    yield build_answerer(settings, ingestion)
    ingestion.close()


def test_the_openai_backend_answers_from_a_real_server(answerer: Any) -> None:
    assert answerer.chat.name == "openai:smollm2"
    answer = answerer.answer(LEAVE)
    assert not answer.abstained
    assert "27" in answer.answer
    assert answer.timings["completion_tokens"] > 0


def test_the_core_services_queue_applies_in_front_of_the_server(answerer: Any) -> None:
    queue = answerer.queue
    assert (queue.slots, queue.limit) == (1, 1)
    first = answerer.stream(LEAVE, ticket=queue.admit("ann"))
    assert next(e for e in first if e["type"] == "token")  # holds the one slot, mid-answer

    second: list[dict[str, Any]] = []
    told = threading.Event()

    def ask_second() -> None:
        for event in answerer.stream(HOURS, ticket=ticket):
            second.append(event)
            if event["type"] == "queue":
                told.set()

    ticket = queue.admit("bob")
    thread = threading.Thread(target=ask_second)
    thread.start()
    try:
        assert told.wait(TIMEOUT), "the second question was not told its place"
        kinds = [e["type"] for e in second]
        assert kinds[:2] == ["sources", "queue"]  # its evidence came before the model's turn
        with pytest.raises(Busy) as refused:  # one waits: the limit is reached
            queue.admit("cy")
        assert refused.value.retry_after_s >= 1
    finally:
        rest = list(first)
        thread.join(TIMEOUT)
    assert "27" in rest[-1]["answer"].answer
    assert second[-1]["type"] == "answer"
    assert "8" in second[-1]["answer"].answer
    ticket.close()
    assert queue.length == 0


def test_the_server_extra_is_pinned_to_the_installed_llama_cpp_python() -> None:
    """``llama-cpp-python[server]`` in the dev extra names the same version as the runtime
    pin, so installing it never rebuilds llama.cpp."""
    import tomllib

    project = tomllib.loads(
        (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text(encoding="utf-8")
    )["project"]
    runtime = [d for d in project["dependencies"] if d.startswith("llama-cpp-python")]
    dev = [d for d in project["optional-dependencies"]["dev"] if d.startswith("llama-cpp-python")]
    assert runtime
    assert dev
    assert dev[0].split("==")[1] == runtime[0].split("==")[1]
    assert dev[0].startswith("llama-cpp-python[server]==")
