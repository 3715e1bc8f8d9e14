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
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from appliance.api import Handler, Raw, Request
from appliance.appliance import LOCAL, UNAVAILABLE, Identity, local_user
from appliance.core.errors import AccessDenied, ApplianceError, AuthError

if TYPE_CHECKING:
    from appliance.accounts import Accounts
    from appliance.answering import Answerer
    from appliance.api import ApiServer
    from appliance.conversations import ConversationStore
    from appliance.core.audit import AuditLog
    from appliance.local import LocalAppliance
    from appliance.metrics import Metrics, MetricsServer
    from appliance.wiring import Ingestion
    from ingest.pipeline import IngestReport
    from ingest.watcher import FolderWatcher

__all__ = ["LOCAL", "UNAVAILABLE", "CoreService", "Identity", "RateLimit", "local_user"]

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"^[^/\\\x00-\x1f\x7f]{1,200}$")
# File systems limit a name to 255 bytes, not characters: 200 "é" are 400 bytes.
_MAX_NAME_BYTES = 200


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


class CoreService:
    """The local API's routes over the data folder's ``LocalAppliance``, with the folder
    watcher and the metrics endpoint; built by ``appliance.wiring``.

    A route checks who calls and what they may do, validates the request, delegates to the
    ``LocalAppliance`` and audits; the appliance does the work, so the CLI sees the same JSON
    through the service as without it. The service is the one owner of everything it runs on:
    ``close()`` (or leaving ``with``) stops the servers and closes the ingestion, the chat
    model, the conversations, the accounts and the audit log, in the reverse order of opening.
    """

    def __init__(
        self,
        local: LocalAppliance,
        *,
        accounts: Accounts | None = None,
        audit: AuditLog | None = None,
        metrics: Metrics | None = None,
        stack: ExitStack | None = None,
    ) -> None:
        self.local = local
        self.settings = local.settings
        self.accounts = accounts
        self.audit = audit
        self.metrics = metrics
        self._stack = stack or ExitStack()
        self.started = time.time()
        self._failed_logins = RateLimit(per_minute=3)
        self._last_success: float | None = None
        # Built by wiring for this service, and handed over with ``attach``.
        self.watcher: FolderWatcher
        self.api: ApiServer
        self.metrics_server: MetricsServer | None = None
        if metrics is not None and self.answerer is not None:
            metrics.set_model(self.answerer.chat.name, self._model_version(), self._model_origin())

    def attach(
        self,
        *,
        watcher: FolderWatcher,
        api: ApiServer,
        metrics_server: MetricsServer | None = None,
    ) -> None:
        """The servers wiring built for this service (they call back into it)."""
        self.watcher, self.api, self.metrics_server = watcher, api, metrics_server

    @property
    def ingestion(self) -> Ingestion:
        return self.local.ingestion()

    @property
    def answerer(self) -> Answerer | None:
        return self.local.answerer()

    @property
    def conversations(self) -> ConversationStore | None:
        return self.local.conversation_store

    def routes(self) -> dict[tuple[str, str], Handler]:
        """Every route of the local API: ``(method, path) -> handler(Request)``."""
        user, admin = self._as_user, self.as_admin
        routes: dict[tuple[str, str], Handler] = {
            ("POST", "/auth/login"): self._login,
            ("POST", "/auth/logout"): self._logout,
            ("GET", "/auth/me"): lambda request: self._me(self.identify(request)),
            ("POST", "/auth/password"): self._change_password,
            ("GET", "/status"): admin(lambda _who, _b: self.status()),
            ("POST", "/search"): user(self._search),
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
            ("GET", "/admin/documents"): admin(lambda _who, _b: self.local.documents()),
            ("POST", "/admin/upload"): admin(self._upload),
            ("GET", "/admin/users"): admin(lambda _who, _b: self.local.users()),
            ("POST", "/admin/users/create"): admin(self._user_create),
            ("POST", "/admin/users/update"): admin(self._user_update),
            ("GET", "/admin/groups"): admin(lambda _who, _b: self.local.groups()),
            ("POST", "/admin/grants"): admin(self._grants),
            ("GET", "/admin/feedback"): admin(lambda _who, _b: self.local.feedback_stats()),
            ("POST", "/admin/backup"): admin(self._backup),
            ("POST", "/admin/chunks"): admin(self._chunks),
        }
        from appliance.model_routes import model_routes

        # GET /admin/models is model_routes' (the registry's versions with the summary).
        routes.update(model_routes(self))
        return routes

    # --- identity and access -----------------------------------------------------------------

    def _accounts(self) -> Accounts:
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

    def _as_user(self, handler: Callable[[Identity, dict[str, Any]], Any]) -> Handler:
        return lambda request: handler(self._acting(request), request.body)

    def as_admin(self, handler: Callable[[Identity, dict[str, Any]], Any]) -> Handler:
        def check(request: Request) -> Any:
            who = self._acting(request)
            if not who.is_admin:
                self.audit_event("access_denied", who.username, route="admin")
                raise AccessDenied("this needs the admin role")
            return handler(who, request.body)

        return check

    def audit_event(self, event: str, user: str | None, **data: Any) -> None:
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
        self.audit_event("login", session.username, client=client)
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
        from appliance.core.audit import valid_user

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
        self.audit_event("login_failed", user, **data)

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
        self.audit_event("admin", name, action="password_change", target=name)
        return {"ok": True, **self._me(self.identify(request))}

    def _logout(self, request: Request) -> dict[str, Any]:
        if request.session:
            who = self.identify(request)
            self._accounts().logout(request.session)
            self.audit_event("logout", who.username)
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
        out: dict[str, Any] = dict(self.local.status())
        out["watcher"] = self.watcher.health()
        out["service"] = {"pid": os.getpid(), "port": self.api.port, "started": self.started}
        out["docs_dir"] = str(self.ingestion.docs_dir)
        out["switching_from"] = self.ingestion.previous
        out["answering"] = self.answerer is not None
        return out

    def on_report(self, report: IngestReport) -> None:
        """After each reconcile of the watcher: the last success and the metrics."""
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

    def _search(self, who: Identity, body: dict[str, Any]) -> list[dict[str, Any]]:
        query = str(body["query"])
        k, mode = int(body.get("k", 5)), str(body.get("mode", "hybrid"))
        return cast(list[dict[str, Any]], self.local.search([query], k, mode, who=who)[0])  # type: ignore[arg-type]

    def _search_batch(self, who: Identity, body: dict[str, Any]) -> list[list[dict[str, Any]]]:
        queries = body["queries"]
        if not isinstance(queries, list):
            raise ValueError("queries must be a list of strings")
        k, mode = body.get("k", 5), body.get("mode", "hybrid")
        return self.local.search([str(q) for q in queries], int(k), str(mode), who=who)  # type: ignore[arg-type,return-value]

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
                events = self.local.ask(
                    question,
                    user=user,
                    conversation=body.get("conversation"),
                    who=who,
                    ticket=ticket,
                )
                yield from self._audited_answer(
                    cast(Iterator[dict[str, Any]], events), user, question
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
                    self.audit_event(
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
                self.audit_event("question", user, question=question, retrieved=[])
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
            self.audit_event("answer_end", user, **end)

    # --- conversations and feedback ----------------------------------------------------------

    def _owner(self, who: Identity, body: dict[str, Any]) -> str:
        """Whose conversation: the signed-in user, or for a local operator (the CLI, holding
        the service token) the ``local:`` identity it names, which no account can take."""
        if who.collections is not None:
            return who.username
        return local_user(body.get("user"))

    def _conversation_list(self, who: Identity, body: dict[str, Any]) -> Any:
        return self.local.conversations(self._owner(who, body))

    def _conversation_get(self, who: Identity, body: dict[str, Any]) -> Any:
        return self.local.messages(self._owner(who, body), str(body["conversation"]), who=who)

    def _conversation_rename(self, who: Identity, body: dict[str, Any]) -> Any:
        owner = self._owner(who, body)
        return self.local.rename_conversation(owner, str(body["conversation"]), str(body["title"]))

    def _conversation_delete(self, who: Identity, body: dict[str, Any]) -> Any:
        return self.local.delete_conversation(self._owner(who, body), str(body["conversation"]))

    def _feedback(self, who: Identity, body: dict[str, Any]) -> Any:
        rating = str(body["rating"])
        if rating not in ("up", "down"):
            raise ValueError("rating must be 'up' or 'down'")
        user = self._owner(who, body)
        comment = str(body.get("comment") or "")[:2000]
        self.local.feedback(user, int(body["message"]), rating, comment)
        self.audit_event(
            "feedback", user, message=int(body["message"]), rating=rating, comment=comment
        )
        if self.metrics is not None:
            self.metrics.feedback(rating)
        return {"ok": True}

    # --- documents ---------------------------------------------------------------------------

    def _document_file(self, who: Identity, body: dict[str, Any]) -> Raw:
        rel = str(body["path"])
        path = self.local.document_path(rel, who=who)
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        self.audit_event("document_download", who.username, path=rel)
        return Raw(path.read_bytes(), content_type, path.name)

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
        self.audit_event("document_upload", who.username, path=rel, size=len(data))
        return {"path": rel, "size": len(data)}

    # --- users and models --------------------------------------------------------------------

    def _user_create(self, who: Identity, body: dict[str, Any]) -> Any:
        return self.local.add_user(
            str(body["username"]),
            str(body["password"]),
            role=str(body.get("role", "staff")),
            groups=list(body.get("groups") or []),
            operator=str(body.get("operator") or ""),
            who=who,
        )

    def _user_update(self, who: Identity, body: dict[str, Any]) -> Any:
        return self.local.update_user(
            str(body["username"]),
            role=str(body["role"]) if "role" in body else None,
            disabled=bool(body["disabled"]) if "disabled" in body else None,
            groups=list(body["groups"] or []) if "groups" in body else None,
            password=str(body["password"]) if body.get("password") else None,
            operator=str(body.get("operator") or ""),
            who=who,
        )

    def _grants(self, who: Identity, body: dict[str, Any]) -> Any:
        return self.local.grant(
            str(body["group"]),
            list(body.get("grant") or []),
            list(body.get("revoke") or []),
            operator=str(body.get("operator") or ""),
            who=who,
        )

    def _model_version(self) -> str:
        return self.local.model_version()

    def _model_origin(self) -> str:
        return self.local.model_origin()

    def models_info(self) -> dict[str, Any]:
        return dict(self.local.model_summary())

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
            self.audit_event("deletion_confirmed", who.username, removed=report.removed)
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

    def close(self) -> None:
        """Stop serving, then close everything this service owns (safe to call twice)."""
        try:
            self.stop()
        finally:
            self._stack.close()

    def __enter__(self) -> CoreService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _chunks(self, who: Identity, body: dict[str, Any]) -> list[dict[str, str]]:
        """A seeded sample of indexed chunk texts (``appliance dataset build --from docs``
        reads them here, since this process owns the index). Admins see only the collections
        granted to them, like everyone else, and every such read is audited."""
        limit, seed = int(body.get("limit", 50)), int(body.get("seed", 0))
        if not 1 <= limit <= 10_000:
            raise ValueError(f"limit must be between 1 and 10000, got {limit}")
        wanted = body.get("collections")  # `dataset build --collections`: narrows, never widens
        if wanted is not None and (
            not isinstance(wanted, list) or not all(isinstance(c, str) for c in wanted)
        ):
            raise ValueError("collections must be a list of collection names")
        narrowed = None if wanted is None else frozenset(wanted)
        chunks = self.local.chunks(limit, seed, who=who, collections=narrowed)
        self.audit_event(
            "admin",
            who.username,
            action="chunks_read",
            collections=None if wanted is None else sorted(wanted),
            count=len(chunks),
            files=sorted({c["file"] for c in chunks}),
        )
        return cast(list[dict[str, str]], chunks)

    def _backup(self, who: Identity, body: dict[str, Any]) -> dict[str, Any]:
        """A backup of the data folder this service owns, with ingestion's writes held while
        the index and its state are copied (appliance.backup)."""
        path = Path(str(body["path"]))
        manifest = self.local.backup(path, include_models=bool(body.get("include_models")))
        self.audit_event("admin", who.username, action="backup", target=str(path))
        return manifest
