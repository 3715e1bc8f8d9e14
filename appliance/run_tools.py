"""What a fine-tuning run needs from the application: the chat models it loads a GGUF with,
and the golden-set evaluation of a GGUF, which needs the index. ``finetune.runs`` receives
them as a ``RunTools``, so it never builds a chat model or opens the index itself.

The chat models come from wiring's one factory (``ChatModels``); the golden set is answered by
the appliance ``wiring.connect`` chooses: the running core service when there is one (it owns
the index), else the data folder opened in this process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.chat.factory import smoke_chat_model
from appliance.core.evaluation import GoldenItem
from appliance.core.settings import Settings
from finetune.gate import GoldenEvaluator
from finetune.runs import RunTools


def run_tools(settings: Settings) -> RunTools:
    """The tools of a run started with ``settings``."""
    from appliance.wiring import chat_models

    return RunTools(
        load_model=chat_models(settings).from_file,
        load_smoke=lambda path: smoke_chat_model(path, settings.chat.n_threads or 2),
        golden_evaluator=golden_evaluator(settings),
    )


def golden_evaluator(settings: Settings) -> GoldenEvaluator:
    """Evaluate through the running core service (it owns the index) or, when none runs, by
    opening the index in this process."""

    def evaluate_golden(gguf: Path, items: Sequence[GoldenItem]) -> dict[str, Any]:
        from appliance.wiring import connect

        # Chosen at each evaluation: the service may have started or stopped meanwhile.
        with connect(settings, role="appliance gate") as appliance:
            return appliance.evaluate(gguf, items)

    return evaluate_golden
