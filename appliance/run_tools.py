"""What a fine-tuning run needs from the application: the chat models it loads a GGUF with,
and the golden-set evaluation of a GGUF, which needs the index. ``finetune.runs`` receives
them as a ``RunTools``, so it never builds a chat model or opens the index itself.

The golden set is answered through the running core service when there is one (it owns the
index), else by opening the index in this process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from appliance.api import ServiceClient
from appliance.chat.factory import llamacpp_chat_model, smoke_chat_model
from appliance.core.evaluation import GoldenItem
from appliance.core.settings import Settings
from appliance.golden import evaluate_with_model
from finetune.runs import RunTools


def run_tools(settings: Settings) -> RunTools:
    """The tools of a run started with ``settings``."""
    return RunTools(
        load_model=lambda path: llamacpp_chat_model(settings.chat, path),
        load_smoke=lambda path: smoke_chat_model(path, settings.chat.n_threads or 2),
        golden_evaluator=golden_evaluator(settings),
    )


def golden_evaluator(settings: Settings) -> Callable[[Path, Sequence[GoldenItem]], Any]:
    """Evaluate through the running core service (it owns the index) or, when none runs, by
    opening the index in this process."""

    def remote(gguf: Path, items: Sequence[GoldenItem]) -> dict[str, Any]:
        client = ServiceClient.find(settings.data_dir)
        if client is None:
            return local(gguf, items)
        body = {"gguf": str(gguf), "items": [asdict(i) for i in items]}
        result: dict[str, Any] = client.call("POST", "/admin/finetune/evaluate", body)
        return result

    def local(gguf: Path, items: Sequence[GoldenItem]) -> dict[str, Any]:
        from appliance.wiring import build_answerer, open_ingestion

        with open_ingestion(settings, settings.ingest.docs_dir, role="appliance gate") as ing:
            answerer = build_answerer(settings, ing)
            return evaluate_with_model(settings, answerer, gguf, items)

    return remote
