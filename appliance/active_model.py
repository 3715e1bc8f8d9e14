"""The chat model the model registry marks active, switched while the service runs.

``appliance models activate`` (another process) or the admin page rewrites the registry; the
core service notices at its next question, loads the new GGUF after checking its sha256, and
keeps answering with the old one until the new one is ready. A stream that started on the old
model finishes on it; the old model is closed when its last stream ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from appliance.chat.base import BaseChatModel, Usage
from appliance.chat.llamacpp import LlamaCppChatModel
from appliance.core.errors import ApplianceError
from appliance.core.protocols import ChatMessage, GenerationParams

log = logging.getLogger(__name__)

Loader = Callable[[Path], BaseChatModel]


class RegistryChatModel(BaseChatModel):
    """A ``ChatModel`` that follows the registry's active version (llama.cpp backend)."""

    def __init__(
        self,
        registry: Any,  # finetune.registry.ModelRegistry: imported lazily by the caller
        loader: Loader,
        *,
        default_params: GenerationParams | None = None,
        check_every_s: float = 1.0,
    ) -> None:
        super().__init__(default_params)
        self._registry = registry
        self._loader = loader
        self._check_every_s = check_every_s
        self._lock = threading.Lock()
        self._streams: dict[int, int] = {}  # id(model) -> streams in flight on it
        self._retired: list[BaseChatModel] = []
        self._last_check = 0.0
        self.switch_error: str | None = None
        self._stamp = registry.stamp()
        record = registry.active()
        self._version = str(record["version"])
        self._model = loader(registry.verified_gguf(self._version))

    # --- following the registry --------------------------------------------------------------

    @property
    def version(self) -> str:
        return self._version

    def current(self) -> BaseChatModel:
        """The active model, after loading a newly activated one if the registry changed."""
        now = time.monotonic()
        with self._lock:
            if now - self._last_check < self._check_every_s:
                return self._model
            self._last_check = now
            stamp = self._registry.stamp()
            if stamp == self._stamp:
                return self._model
            self._stamp = stamp
            record = self._registry.active()
            version = str(record["version"])
            if version == self._version:
                return self._model
            try:
                # Loading takes a second or so for small models; questions wait for it rather
                # than being answered by a model the admin just replaced.
                model = self._loader(self._registry.verified_gguf(version))
            except ApplianceError as exc:
                self.switch_error = f"cannot switch to model {version}: {exc}"
                log.error("%s; still answering with %s", self.switch_error, self._version)
                return self._model
            log.info("chat model switched: %s -> %s (%s)", self._version, version, model.name)
            self._retire(self._model)
            self._model, self._version, self.switch_error = model, version, None
            return self._model

    def reload_now(self) -> None:
        """Check the registry at once (after an activation in this process)."""
        with self._lock:
            self._last_check = 0.0
        self.current()

    def _retire(self, model: BaseChatModel) -> None:
        if self._streams.get(id(model), 0):
            self._retired.append(model)
        else:
            model.close()

    # --- ChatModel ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.current().name

    @property
    def context_length(self) -> int:
        return self.current().context_length

    def count_tokens(self, text: str) -> int:
        return self.current().count_tokens(text)

    def render_prompt(self, messages: list[ChatMessage]) -> str:
        model = self.current()
        if not isinstance(model, LlamaCppChatModel):
            raise ApplianceError("only llama.cpp models render prompts locally")
        return model.render_prompt(messages)

    def _generate(
        self, messages: list[ChatMessage], params: GenerationParams
    ) -> Generator[str, None, Usage]:
        model = self.current()
        with self._lock:
            self._streams[id(model)] = self._streams.get(id(model), 0) + 1
        try:
            return (yield from model._generate(messages, params))
        finally:
            with self._lock:
                left = self._streams[id(model)] - 1
                if left:
                    self._streams[id(model)] = left
                else:
                    del self._streams[id(model)]
                    if model in self._retired:
                        self._retired.remove(model)
                        model.close()

    def _close(self) -> None:
        with self._lock:
            for model in [self._model, *self._retired]:
                model.close()
            self._retired.clear()
