"""The composition root: the one place that picks implementations from the settings.

``open_ingestion`` takes ownership of the data folder and builds the indexer over the store
collection that belongs to the configured embedding model. When that model changed, the new
collection is filled first while searches keep using the old one, and ``finish_switch`` moves
over only once a full scan is complete.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.core.errors import ApplianceError, ModelError, StoreLockedError
from appliance.core.offline import allowed_hosts_from_urls, enforce_offline
from appliance.core.ownership import DataDirLock
from appliance.core.protocols import Embedder, StoreBackend
from appliance.core.settings import Settings
from ingest.state import ACTIVE_COLLECTION, ACTIVE_MODEL_ID, ACTIVE_MODEL_PATH

if TYPE_CHECKING:
    # Annotations only: importing these at run time would load the model libraries.
    from appliance.accounts import Accounts
    from appliance.answering import Answerer
    from appliance.api import ApiServer, Handler, ServiceClient
    from appliance.appliance import Appliance
    from appliance.chat.base import BaseChatModel
    from appliance.chat.llamacpp import LlamaCppChatModel
    from appliance.conversations import ConversationStore
    from appliance.core.audit import AuditLog
    from appliance.core.chat_settings import ChatSettings
    from appliance.metrics import Metrics, MetricsServer
    from appliance.service import CoreService
    from ingest.parsers import ParseOptions
    from ingest.pipeline import Indexer, IngestReport
    from ingest.state import IngestState
    from ingest.watcher import FolderWatcher

log = logging.getLogger(__name__)


def prepare_process(settings: Settings) -> None:
    """What every appliance process does first: no network but loopback and configured hosts."""
    import os

    # llama.cpp's OpenMP threads spin while waiting; on a small shared CPU that costs 3-10x.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    enforce_offline(
        allowed_hosts_from_urls(
            [settings.store.url, settings.chat.url, settings.finetune.ollama_url]
        )
    )


def build_embedder(settings: Settings) -> Embedder:
    from ingest.embedders import SentenceTransformerEmbedder

    e = settings.embedding
    return SentenceTransformerEmbedder(e.model_path, device=e.device, batch_size=e.batch_size)


def build_backend(settings: Settings) -> StoreBackend:
    from ingest.store import EdgeBackend, ServerBackend

    s = settings.store
    if s.mode == "server":
        if not s.url:
            raise ApplianceError(
                "store.mode is 'server' but store.url is empty; set APPLIANCE_STORE__URL"
            )
        return ServerBackend.from_url(s.url, s.api_key, s.collection_prefix)
    return EdgeBackend(settings.index_dir)


def parse_options(settings: Settings) -> ParseOptions:
    """The parsers' options (``ingest.parsers.ParseOptions``) from the OCR and table settings."""
    from ingest.ocr import OcrOptions
    from ingest.parsers import ParseOptions

    ocr = settings.ocr
    return ParseOptions(
        ocr=OcrOptions(
            engine=ocr.engine,
            languages=tuple(ocr.languages),
            dpi=ocr.dpi,
            min_text_chars=ocr.min_text_chars,
            max_pages=ocr.max_pages,
        ),
        tables=settings.ingest.tables,
        table_style=settings.ingest.table_rows,
    )


def collection_name(settings: Settings, embedder: Embedder) -> str:
    """One collection per embedding model: a new model never mixes vectors with the old one."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", embedder.model_id).strip("-")[:40]
    digest = hashlib.sha256(embedder.model_id.encode()).hexdigest()[:8]
    return f"{settings.store.collection_prefix}_{slug}_{digest}"


@dataclass
class Ingestion:
    """The ingestion services of the data folder's owner; closes them all on exit."""

    settings: Settings
    docs_dir: Path
    indexer: Indexer
    searcher: Indexer
    """The indexer whose collection serves searches now (the old one during a switch)."""
    state: IngestState
    backend: StoreBackend
    _stack: ExitStack = field(repr=False)
    previous: str | None = None
    """The collection of the previous embedding model while the new one is being filled."""

    def finish_switch(self) -> None:
        """After a complete scan into a new model's collection: serve it, drop the old one."""
        old = self.previous
        if old is None:
            return
        self.previous = None
        _activate(
            self.state, self.settings, self.indexer.collection, self.indexer.embedder.model_id
        )
        self.searcher = self.indexer
        self.backend.drop(old)
        self.state.drop_collection(old)
        log.info("switched search to collection %s; dropped %s", self.indexer.collection, old)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Ingestion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _model_path(settings: Settings) -> str:
    return str(settings.embedding.model_path or "")


def open_ingestion(
    settings: Settings,
    docs_dir: Path | None = None,
    *,
    role: str,
    embedder: Embedder | None = None,
    lock: bool = True,
) -> Ingestion:
    """Own the data folder and build the indexer (and, during a model switch, the old searcher).

    ``lock=False``: the caller already holds the data folder's lock (``LocalAppliance``)."""
    from ingest.embedders import Bm25Encoder
    from ingest.parsers import supported_suffixes
    from ingest.pipeline import Indexer
    from ingest.sandbox import ParserSandbox
    from ingest.state import IngestState

    stack = ExitStack()
    try:
        if lock:
            stack.enter_context(DataDirLock(settings.data_dir, role))
        state = IngestState(settings.state_path)
        stack.callback(state.close)
        embedder = embedder or build_embedder(settings)
        backend = build_backend(settings)
        stack.callback(backend.close)
        ing = settings.ingest
        sandbox = ParserSandbox(
            timeout_s=ing.parse_timeout_s,
            memory_mb=ing.parse_memory_mb,
            max_text_chars=ing.max_text_chars,
            options=parse_options(settings),
        )
        stack.callback(sandbox.close)
        sparse = Bm25Encoder()
        docs = docs_dir or ing.docs_dir

        def indexer_for(name: str, model: Embedder) -> Indexer:
            return Indexer(
                docs_dir=docs,
                state=state,
                store=backend.open(name, model.dim),
                embedder=model,
                sparse=sparse,
                parser=sandbox,
                suffixes=supported_suffixes(),
                ingest=ing,
                chunking=settings.chunking,
                staging=sandbox.staging,
            )

        target = collection_name(settings, embedder)
        indexer = indexer_for(target, embedder)
        indexer.recover()
        searcher = indexer
        previous = None
        active = state.get_meta(ACTIVE_COLLECTION)
        if active is None:
            _activate(state, settings, target, embedder.model_id)
        elif active != target and active in backend.collections():
            previous = active
            old_model = _old_embedder(
                settings, state.get_meta(ACTIVE_MODEL_PATH), state.get_meta(ACTIVE_MODEL_ID)
            )
            if old_model is not None:
                searcher = indexer_for(active, old_model)
                log.warning(
                    "embedding model changed: re-indexing into %s; searches use %s until done",
                    target,
                    active,
                )
        elif active != target:  # the previous collection is gone: nothing to keep serving
            _activate(state, settings, target, embedder.model_id)
        return Ingestion(settings, docs, indexer, searcher, state, backend, stack, previous)
    except BaseException:
        stack.close()
        raise


def _activate(state: IngestState, settings: Settings, collection: str, model_id: str) -> None:
    """Record which collection (and so which embedding model) serves searches."""
    state.set_meta(ACTIVE_COLLECTION, collection)
    state.set_meta(ACTIVE_MODEL_PATH, _model_path(settings))
    state.set_meta(ACTIVE_MODEL_ID, model_id)


def _old_embedder(settings: Settings, path: str | None, model_id: str | None) -> Embedder | None:
    """The previous model, to keep serving the old collection during a switch, if it still
    loads and is still the same model."""
    from ingest.embedders import SentenceTransformerEmbedder

    try:
        model = SentenceTransformerEmbedder(
            Path(path) if path else None, device=settings.embedding.device
        )
    except ApplianceError as exc:
        log.warning("the previous embedding model cannot be loaded (%s)", exc)
        return None
    if model.model_id != model_id:
        log.warning("the previous embedding model changed on disk; searches use the new index")
        return None
    return model


class ChatModels:
    """The one factory of chat models, from the chat settings: the serving model (the model
    registry's active version, switched without a restart), the configured model (synthetic
    data), and a given GGUF (a registry version on activation, a candidate in the gate and the
    golden evaluation, an export's smoke check). Every other module asks here, so which backend
    and which generation defaults apply is decided in one place."""

    def __init__(
        self, chat: ChatSettings, models_dir: Path | None = None, *, max_loaded: int = 2
    ) -> None:
        self.chat = chat
        self.models_dir = models_dir
        self.max_loaded = max_loaded
        """Registry versions the serving model keeps loaded at once (audience-aware serving)."""

    def from_file(self, gguf: Path) -> LlamaCppChatModel:
        """``gguf`` in llama.cpp with the settings' context, threads and generation defaults."""
        from appliance.chat.factory import llamacpp_chat_model

        return llamacpp_chat_model(self.chat, Path(gguf))

    def configured(self) -> BaseChatModel:
        """The model the chat settings name, ignoring the model registry."""
        from appliance.chat.factory import build_chat_model

        return build_chat_model(self.chat)

    def serving(self) -> BaseChatModel:
        """The chat model that answers. With llama.cpp that is the model registry: the active
        version, or for a user not granted its whole audience another version they may use
        (``appliance.core.audience``); the configured or packaged GGUF is the base. Versions
        are checked by hash and switched without a restart. Server backends serve whatever
        model their settings name, to everyone."""
        from appliance.core.chat_settings import default_chat_model_path
        from appliance.core.protocols import GenerationParams

        chat = self.chat
        if chat.backend != "llamacpp" or self.models_dir is None:
            return self.configured()
        from appliance.active_model import RegistryChatModel
        from finetune.registry import ModelRegistry

        base = chat.model_path or default_chat_model_path()
        if not base.is_file():
            return self.configured()  # raises the actionable "not a file" error
        registry = ModelRegistry(self.models_dir)
        try:
            registry.ensure_base(base)
        except ModelError as exc:
            # The admin pointed chat.model_path at another model than the registry's base:
            # serve what the settings say, and say why the registry's versions are not served.
            log.warning("serving %s, not the model registry's active version: %s", base, exc)
            return self.configured()
        params = GenerationParams(
            max_tokens=chat.max_tokens, temperature=chat.temperature, seed=chat.seed
        )
        return RegistryChatModel(
            registry, self.from_file, default_params=params, max_loaded=self.max_loaded
        )


def chat_models(settings: Settings) -> ChatModels:
    return ChatModels(
        settings.chat, settings.models_dir, max_loaded=settings.finetune.max_loaded_versions
    )


def build_active_chat_model(settings: Settings) -> BaseChatModel:
    """The chat model that answers (``ChatModels.serving``)."""
    return chat_models(settings).serving()


def build_answerer(
    settings: Settings,
    ingestion: Ingestion,
    *,
    owner: ExitStack | None = None,
    observer: Metrics | None = None,
) -> Answerer:
    """The answering engine over the ingestion's searchable collection, with the configured
    chat model; the model is closed by ``owner`` (default: with the ingestion). ``observer``
    hears of the queue in front of the model (the service's ``Metrics``)."""
    from appliance.answering import Answerer, CrossEncoderReranker
    from appliance.turnstile import FairQueue

    chat = chat_models(settings).serving()
    (owner or ingestion._stack).callback(chat.close)
    path = settings.answer.rerank_model_path
    # An engine that sizes its own slots says how many (``slots``) and reports its decode
    # steps to step observers; the queue hands out that many, and the metrics hear the steps.
    slots = int(getattr(chat, "slots", 0) or settings.chat.parallel or 1)
    add_step_observer = getattr(chat, "add_step_observer", None)
    if observer is not None and add_step_observer is not None:
        add_step_observer(
            lambda step: observer.observe_decode_step(
                step.sequences, step.tokens - step.prefill_tokens
            )
        )
    return Answerer(
        index=lambda: ingestion.searcher,
        chat=chat,
        settings=settings.answer,
        chat_settings=settings.chat,
        reranker=CrossEncoderReranker(path) if path else None,
        # Also in front of a model server: the fair order, the per-user cap and the 503
        # beyond the limit are the core service's, whatever generates the answers.
        queue=FairQueue(
            slots=slots,
            per_user=settings.service.queue_per_user,
            limit=settings.service.queue_limit,
            observer=observer,
        ),
    )


def build_watcher(
    settings: Settings, ingestion: Ingestion, on_report: Callable[[IngestReport], None]
) -> FolderWatcher:
    """The watcher that keeps the index equal to the documents folder."""
    from ingest.watcher import FolderWatcher

    return FolderWatcher(ingestion.indexer, settings.ingest, on_report=on_report)


def build_api_server(settings: Settings, routes: dict[tuple[str, str], Handler]) -> ApiServer:
    """The local API (it listens at once: a taken port fails here, before anything runs)."""
    from appliance.api import ApiServer

    service = settings.service
    return ApiServer(
        settings.data_dir,
        service.host,
        service.port,
        routes,
        unix_socket=service.unix_socket,
        max_body=service.max_body_mb * 1024 * 1024,
        max_connections=service.max_connections,
    )


def build_metrics_server(settings: Settings, metrics: Metrics) -> MetricsServer:
    from appliance.metrics import MetricsServer

    return MetricsServer(metrics, host=settings.metrics.host, port=settings.metrics.port)


def assemble_core_service(
    settings: Settings,
    ingestion: Ingestion,
    *,
    role: str = "core service",
    answerer: Answerer | None = None,
    conversations: ConversationStore | None = None,
    accounts: Accounts | None = None,
    audit: AuditLog | None = None,
    metrics: Metrics | None = None,
    stack: ExitStack | None = None,
) -> CoreService:
    """The core service over parts already open (``stack`` closes them with the service):
    its ``LocalAppliance``, and the watcher and servers that call back into it."""
    from appliance.local import LocalAppliance
    from appliance.service import CoreService

    local = LocalAppliance(
        settings,
        role=role,
        ingestion=ingestion,
        answerer=answerer,
        conversations=conversations,
        accounts=accounts,
        audit=audit,
    )
    service = CoreService(local, accounts=accounts, audit=audit, metrics=metrics, stack=stack)
    service.attach(
        watcher=build_watcher(settings, ingestion, service.on_report),
        api=build_api_server(settings, service.routes()),
        metrics_server=build_metrics_server(settings, metrics) if metrics is not None else None,
    )
    return service


def open_core_service(
    settings: Settings, docs_dir: Path, *, role: str, answering: bool = True
) -> CoreService:
    """The core service with everything it owns: ingestion, the chat model, conversations,
    accounts, the audit log, the metrics, the watcher and the servers. Close it with
    ``service.close()`` (or ``with service:``)."""
    from appliance.accounts import Accounts
    from appliance.conversations import ConversationStore
    from appliance.core.audit import journal_anchor, open_audit_log
    from appliance.metrics import Metrics

    stack = ExitStack()
    try:
        ingestion = stack.enter_context(open_ingestion(settings, docs_dir, role=role))
        conversations = ConversationStore(settings.conversations_path)
        stack.callback(conversations.close)
        accounts = Accounts(settings.accounts_path, session_ttl_s=settings.session_hours * 3600)
        stack.callback(accounts.close)
        audit = open_audit_log(settings, on_anchor=journal_anchor)
        stack.callback(audit.close)
        owner: list[CoreService] = []  # the service, once built: /metrics refreshes per scrape
        metrics = Metrics(collect=lambda: owner[0].refresh_metrics() if owner else None)
        answerer = None
        if answering:
            try:
                answerer = build_answerer(settings, ingestion, owner=stack, observer=metrics)
                # built with a FairQueue above; other queues (Unqueued) have no slot count
                metrics.set_slots(int(getattr(answerer.queue, "slots", 1)))
            except ApplianceError as exc:
                log.error("answering is off: %s", exc)
        service = assemble_core_service(
            settings,
            ingestion,
            role=role,
            answerer=answerer,
            conversations=conversations,
            accounts=accounts,
            audit=audit,
            metrics=metrics,
            stack=stack,
        )
        owner.append(service)
        return service
    except BaseException:
        stack.close()
        raise


def find_service(settings: Settings) -> ServiceClient | None:
    """The client of the data folder's running core service, or None when none answers."""
    from appliance.api import ServiceClient

    return ServiceClient.find(settings.data_dir)


def connect(settings: Settings, *, role: str, docs_dir: Path | None = None) -> Appliance:
    """The data folder's appliance, chosen once: through the running core service when one
    answers (it owns the index), else opened in this process under the data folder's lock,
    as ``role`` (the name a second writer is told). Close it (it is a context manager)."""
    from appliance.local import LocalAppliance
    from appliance.remote import RemoteAppliance

    client = find_service(settings)
    if client is not None:
        return RemoteAppliance(client)
    return LocalAppliance(
        settings,
        role=role,
        docs_dir=docs_dir,
        open_ingestion=open_ingestion,
        build_answerer=build_answerer,
    )


@contextmanager
def stopped(settings: Settings, *, role: str, doing: str) -> Iterator[None]:
    """The data folder held under its ownership lock by this process, for what replaces the
    folder itself (``appliance restore``) and so is no ``Appliance`` operation: refused with
    ``StoreLockedError`` while a core service answers for the folder (it owns it), never done
    behind the service's back. ``doing`` ends the refusal: "stop it before restoring"."""
    if find_service(settings) is not None:
        raise StoreLockedError(
            f"the core service is running on {settings.data_dir}: stop it before {doing}"
        )
    with DataDirLock(settings.data_dir, role):
        yield
