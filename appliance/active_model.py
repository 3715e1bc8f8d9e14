"""The chat models of the model registry, served by audience and switched while the service runs.

``appliance models activate`` (another process) or the admin page rewrites the registry; the
core service notices at its next question, loads the new GGUF after checking its sha256, and
keeps answering with the old one until the new one is ready. A stream that started on a model
finishes on it; a model is closed when its last stream ends.

Each question is answered by the version its reader may use (``appliance.core.audience``): the
active one when the reader may read every collection it was trained on, else the newest
servable version they may use, else the base. ``serve(readable)`` hands out that model as a
``ServedModel`` that holds it open until the answer is done. At most ``max_loaded`` models stay
loaded: the active one and the base (once needed) are kept, the least recently used other
version is closed first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from appliance.chat.base import BaseChatModel, Usage
from appliance.chat.llamacpp import LlamaCppChatModel
from appliance.core.audience import BASE, Audience, Candidate, candidates, may_use, served_by
from appliance.core.errors import ApplianceError, ModelError
from appliance.core.protocols import ChatMessage, GenerationParams

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from appliance.chat.batching import StepObserver

Loader = Callable[[Path], BaseChatModel]


class Registry(Protocol):
    """What serving reads of the model registry (``finetune.registry.ModelRegistry``, which
    wiring hands in: this layer does not import ``finetune``)."""

    def stamp(self) -> int: ...

    def serving_order(self) -> list[dict[str, Any]]: ...

    def verified_gguf(self, version: str | None = None) -> Path: ...


DEFAULT_MAX_LOADED = 3


class ServedModel(BaseChatModel):
    """One registry version as one answer uses it: the model stays open (not evicted, not
    closed by a switch) until this is closed, which the answering engine does when the answer
    ends."""

    def __init__(
        self,
        owner: RegistryChatModel,
        candidate: Candidate,
        model: BaseChatModel,
        default_params: GenerationParams,
    ) -> None:
        super().__init__(default_params)
        self._owner = owner
        self._candidate = candidate
        self._model = model

    @property
    def version(self) -> str:
        return self._candidate.version

    @property
    def served_by(self) -> dict[str, Any]:
        return served_by(self._candidate.version, self._model.name, self._candidate.audience)

    @property
    def name(self) -> str:
        return self._model.name

    @property
    def context_length(self) -> int:
        return self._model.context_length

    def count_tokens(self, text: str) -> int:
        return self._model.count_tokens(text)

    def render_prompt(self, messages: list[ChatMessage]) -> str:
        if not isinstance(self._model, LlamaCppChatModel):
            raise ApplianceError("only llama.cpp models render prompts locally")
        return self._model.render_prompt(messages)

    def _generate(
        self, messages: list[ChatMessage], params: GenerationParams
    ) -> Generator[str, None, Usage]:
        return (yield from self._model.pieces(messages, params))

    def _close(self) -> None:
        self._owner._release(self._model)


class RegistryChatModel(BaseChatModel):
    """A ``ChatModel`` that follows the registry (llama.cpp backend). Used directly it answers
    with the active version (the host's operators may use every version); ``serve`` picks the
    version for one reader."""

    def __init__(
        self,
        registry: Registry,
        loader: Loader,
        *,
        default_params: GenerationParams | None = None,
        check_every_s: float = 1.0,
        max_loaded: int = DEFAULT_MAX_LOADED,
    ) -> None:
        super().__init__(default_params)
        self._registry = registry
        self._loader = loader
        self._check_every_s = check_every_s
        self._max_loaded = max(1, max_loaded)
        self._lock = threading.RLock()
        self._loaded: OrderedDict[str, BaseChatModel] = OrderedDict()  # least recent first
        self._leases: dict[int, int] = {}  # id(model) -> answers in flight on it
        self._retired: list[BaseChatModel] = []
        self._failed: dict[str, str] = {}  # version -> why it did not load (this registry stamp)
        self._order: list[Candidate] = []
        self._stamp: int | None = None
        self._last_check = 0.0
        self._version = ""
        self._step_observers: list[StepObserver] = []
        self.switch_error: str | None = None
        with self._lock:
            self._refresh(force=True)
            # The active version loads now, so a broken model fails the start, not a question.
            active = self._order[0].version if self._order else BASE
            self._load(active)
            self._version = active

    # --- following the registry --------------------------------------------------------------

    def _refresh(self, *, force: bool = False) -> None:
        """Re-read the serving order when the registry changed (checked at most every
        ``check_every_s``). Caller holds the lock."""
        now = time.monotonic()
        if not force and now - self._last_check < self._check_every_s:
            return
        self._last_check = now
        stamp = self._registry.stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        self._order = candidates(self._registry.serving_order())
        self._failed.clear()
        kept = {c.version for c in self._order}
        for version in [v for v in self._loaded if v not in kept]:
            self._retire(self._loaded.pop(version))  # rolled back from, or its gate failed

    def _load(self, version: str) -> BaseChatModel:
        """The loaded model of ``version``, loading it (after checking its hash) if needed.
        Caller holds the lock: a question waits for a load rather than being answered by a
        model its reader may not use."""
        model = self._loaded.get(version)
        if model is None:
            model = self._loader(self._registry.verified_gguf(version))
            self._loaded[version] = model
            for observer in self._step_observers:
                _observe_steps(model, observer)
            log.info("chat model %s loaded (%s)", version, model.name)
            self._evict(keep=version)
        self._loaded.move_to_end(version)
        return model

    def _evict(self, keep: str) -> None:
        pinned = {keep, BASE, self._order[0].version if self._order else BASE}
        while len(self._loaded) > self._max_loaded:
            victim = next((v for v in self._loaded if v not in pinned), None)
            if victim is None:
                return
            log.info("chat model %s unloaded (least recently used)", victim)
            self._retire(self._loaded.pop(victim))

    def _pick(self, readable: Audience | None) -> tuple[Candidate, BaseChatModel]:
        """The first version of the serving order the reader may use that loads, and its
        model. Caller holds the lock."""
        self._refresh()
        errors = []
        order = list(self._order)
        previous = next((c for c in order[1:] if c.version == self._version), None)
        if order and order[0].version in self._failed and previous is not None:
            # The new active version does not load: keep answering with the one that served
            # before it, where the reader may use it, rather than with some other version.
            order.remove(previous)
            order.insert(1, previous)
        for candidate in order:
            if not may_use(candidate.audience, readable):
                continue
            if candidate.version in self._failed:
                errors.append(self._failed[candidate.version])
                continue
            try:
                model = self._load(candidate.version)
            except ApplianceError as exc:
                message = f"cannot switch to model {candidate.version}: {exc}"
                self._failed[candidate.version] = message
                errors.append(message)
                log.error("%s; answering with the next version allowed", message)
                continue
            if readable is None:
                if candidate.version != self._version:
                    log.info("chat model switched: %s -> %s", self._version, candidate.version)
                self._version = candidate.version
                active = self._order[0].version
                self.switch_error = (
                    self._failed.get(active) if active != candidate.version else None
                )
            return candidate, model
        raise ModelError(
            "no model version this user may be answered by can be loaded"
            + (f": {'; '.join(errors)}" if errors else " (the base is not registered)")
        )

    def serve(self, readable: Audience | None) -> ServedModel:
        """The model that answers a reader of ``readable`` (None: every collection), held open
        until the returned ``ServedModel`` is closed."""
        with self._lock:
            candidate, model = self._pick(readable)
            self._leases[id(model)] = self._leases.get(id(model), 0) + 1
        return ServedModel(self, candidate, model, self.default_params)

    def _release(self, model: BaseChatModel) -> None:
        with self._lock:
            left = self._leases.get(id(model), 0) - 1
            if left > 0:
                self._leases[id(model)] = left
                return
            self._leases.pop(id(model), None)
            if model in self._retired:
                self._retired.remove(model)
                model.close()

    def _retire(self, model: BaseChatModel) -> None:
        if self._leases.get(id(model), 0):
            self._retired.append(model)  # closed when its last answer ends
        else:
            model.close()

    @property
    def version(self) -> str:
        """The version the host's operators are answered by: the active one, unless it failed
        to load."""
        with self._lock:
            return self._pick(None)[0].version

    def current(self) -> BaseChatModel:
        """The active model, after loading a newly activated one if the registry changed."""
        with self._lock:
            return self._pick(None)[1]

    def reload_now(self) -> None:
        """Check the registry at once (after an activation in this process)."""
        with self._lock:
            self._last_check = 0.0
        self.current()

    def loaded_versions(self) -> list[str]:
        """The versions loaded now, least recently used first."""
        with self._lock:
            return list(self._loaded)

    # --- the engine's slots, for the queue and the metrics -----------------------------------

    @property
    def slots(self) -> int:
        """Answers the served engine decodes together (1 for the serial one): the core
        service's queue hands out this many turns. Without it the queue would admit one answer
        at a time in front of a batching engine."""
        return int(getattr(self.current(), "slots", 1) or 1)

    def add_step_observer(self, observer: StepObserver) -> None:
        """Hear every decode step of every loaded version, also of those loaded later."""
        with self._lock:
            self._step_observers.append(observer)
            for model in self._loaded.values():
                _observe_steps(model, observer)

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
        served = self.serve(None)
        try:
            return (yield from served.pieces(messages, params))
        finally:
            served.close()

    def _close(self) -> None:
        with self._lock:
            for model in [*self._loaded.values(), *self._retired]:
                model.close()
            self._loaded.clear()
            self._retired.clear()


def _observe_steps(model: BaseChatModel, observer: StepObserver) -> None:
    """Register ``observer`` with an engine that reports its decode steps (the batching one)."""
    add = getattr(model, "add_step_observer", None)
    if add is not None:
        add(observer)
