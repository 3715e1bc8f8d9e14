"""The golden set answered by the appliance's own retrieval with a candidate GGUF: how the
fine-tuning gate compares a candidate with the serving model on real questions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.chat.factory import llamacpp_chat_model
from appliance.core.evaluation import GoldenItem, evaluate
from appliance.core.settings import Settings

if TYPE_CHECKING:
    from appliance.answering import Answerer


def evaluate_with_model(
    settings: Settings,
    answerer: Answerer,
    gguf: Path,
    items: Sequence[GoldenItem],
    where: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """The golden set through ``answerer``'s retrieval with the chat model in ``gguf``,
    searching only the collections in ``where`` (an admin's grants; None: all, for the host's
    operator)."""
    with llamacpp_chat_model(settings.chat, gguf) as model:
        twin = answerer.with_chat(model)
        return evaluate(
            items, lambda q: twin.answer(q, where=where).as_json(), k=settings.answer.top_k
        )
