"""The core service: the one process that owns the index (and later the model) of a data folder.

It runs the folder watcher and serves the local API that ``search``, ``status`` and the UI use.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from appliance.answering import Answerer, ask_events
from appliance.api import ApiServer
from appliance.conversations import ConversationStore
from appliance.errors import ApplianceError
from appliance.settings import Settings
from appliance.wiring import Ingestion

log = logging.getLogger(__name__)


def search_results(ingestion: Ingestion, body: dict[str, Any]) -> list[dict[str, Any]]:
    query = str(body["query"])
    k = int(body.get("k", 5))
    mode = str(body.get("mode", "hybrid"))
    if mode not in ("hybrid", "dense", "sparse"):
        raise ValueError(f"unknown search mode {mode!r}: use hybrid, dense or sparse")
    if not 1 <= k <= 1000:
        raise ValueError(f"k must be between 1 and 1000, got {k}")
    return ingestion.searcher.search(query, k, mode=mode)


class CoreService:
    """The watcher and the local API over one ``Ingestion``; a context manager."""

    def __init__(
        self,
        ingestion: Ingestion,
        settings: Settings,
        answerer: Answerer | None = None,
        conversations: ConversationStore | None = None,
    ) -> None:
        from ingest.watcher import FolderWatcher

        self.ingestion = ingestion
        self.answerer = answerer
        self.conversations = conversations
        self.settings = settings
        self.started = time.time()
        self.watcher = FolderWatcher(ingestion.indexer, settings.ingest)
        self.api = ApiServer(
            settings.data_dir,
            settings.service.host,
            settings.service.port,
            {
                ("GET", "/status"): lambda _body: self.status(),
                ("POST", "/search"): lambda body: search_results(self.ingestion, body),
                ("POST", "/search/batch"): self._search_batch,
                ("POST", "/reconcile"): self._reconcile,
                ("POST", "/ask"): self._ask,
                ("POST", "/conversations"): self._conversations,
            },
        )

    def status(self) -> dict[str, Any]:
        out = self.ingestion.searcher.status()
        out["watcher"] = self.watcher.health()
        out["service"] = {"pid": os.getpid(), "port": self.api.port, "started": self.started}
        out["docs_dir"] = str(self.ingestion.docs_dir)
        out["switching_from"] = self.ingestion.previous
        return out

    def _search_batch(self, body: dict[str, Any]) -> list[list[dict[str, Any]]]:
        queries = body["queries"]
        if not isinstance(queries, list):
            raise ValueError("queries must be a list of strings")
        k = body.get("k", 5)
        mode = body.get("mode", "hybrid")
        return [search_results(self.ingestion, {"query": q, "k": k, "mode": mode}) for q in queries]

    def _ask(self, body: dict[str, Any]) -> Any:
        if self.answerer is None:
            raise ApplianceError("this core service runs without a chat model")
        events = ask_events(
            self.answerer,
            self.conversations,
            str(body["question"]),
            user=str(body.get("user") or "local"),
            conversation=body.get("conversation"),
        )
        if body.get("stream"):
            return events
        final: dict[str, Any] = {}
        for event in events:
            if event["type"] == "answer":
                final = event
        return final

    def _conversations(self, body: dict[str, Any]) -> Any:
        if self.conversations is None:
            raise ApplianceError("this core service keeps no conversations")
        user = str(body.get("user") or "local")
        conversation = body.get("conversation")
        if conversation:
            return self.conversations.messages(user, str(conversation))
        return self.conversations.conversations(user)

    def _reconcile(self, body: dict[str, Any]) -> dict[str, Any]:
        folder = body.get("docs_dir")
        if folder and Path(folder).resolve() != self.ingestion.docs_dir.resolve():
            raise ApplianceError(
                f"the running service watches {self.ingestion.docs_dir}, not {folder}; "
                "stop it to index another folder into this data folder"
            )
        report = self.watcher.reconcile_now(confirm_deletions=bool(body.get("confirm_deletions")))
        if report.held_deletions == 0 and self.watcher.health()["state"] == "ok":
            self.ingestion.finish_switch()
        return report.as_json()

    def start(self) -> None:
        """Serve the API at once, then scan the folder and watch it (the scan may be long)."""
        self.api.start()
        log.info("core service API on %s:%s", self.api.host, self.api.port)
        self.watcher.start()
        if self.watcher.health()["state"] == "ok":
            self.ingestion.finish_switch()

    def stop(self) -> None:
        self.ingestion.indexer.interrupt()
        self.watcher.stop()
        self.api.stop()

    def run_until(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set, also while the startup scan is still going."""
        failures: list[BaseException] = []

        def start() -> None:
            try:
                self.start()
            except BaseException as exc:
                failures.append(exc)
                stop.set()

        starter = threading.Thread(target=start, name="core-start", daemon=True)
        starter.start()
        try:
            stop.wait()
        finally:
            self.ingestion.indexer.interrupt()
            starter.join()
            self.stop()
        if failures:
            raise failures[0]

    def __enter__(self) -> CoreService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
