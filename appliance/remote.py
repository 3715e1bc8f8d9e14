"""``RemoteAppliance``: the ``Appliance`` protocol over the running core service's local API.

Every method is one route of ``appliance.service`` / ``appliance.model_routes``; the replies are
passed through as they come, so a client sees the same JSON as from ``LocalAppliance``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, cast

from appliance.appliance import (
    Activated,
    Answer,
    AskEvent,
    Chunk,
    Conversation,
    Documents,
    FeedbackStats,
    Groups,
    Hit,
    Models,
    Ok,
    Progress,
    ReconcileReport,
    SearchMode,
    Status,
)
from appliance.core.errors import ApplianceError

if TYPE_CHECKING:
    from appliance.api import ServiceClient
    from appliance.core.evaluation import GoldenItem


class RemoteAppliance:
    """The data folder's appliance as its running core service serves it."""

    kind: Literal["local", "remote"] = "remote"

    def __init__(self, client: ServiceClient, *, timeout: float | None = None) -> None:
        self.client = client
        self.timeout = timeout
        """Seconds one call may take (None: the client's own, long enough for an answer)."""

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.client.call(method, path, body, timeout=self.timeout)

    def status(self) -> Status:
        return cast(Status, self._call("GET", "/status"))

    def search(
        self, queries: Sequence[str], k: int = 5, mode: SearchMode = "hybrid"
    ) -> list[list[Hit]]:
        body = {"queries": list(queries), "k": k, "mode": mode}
        return cast(list[list[Hit]], self._call("POST", "/search/batch", body))

    def reconcile(
        self,
        docs_dir: Path | None = None,
        *,
        confirm_deletions: bool = False,
        progress: Progress | None = None,
    ) -> ReconcileReport:
        # The service refuses another folder than the one it watches; progress stays there.
        body: dict[str, Any] = {"confirm_deletions": confirm_deletions}
        if docs_dir is not None:
            body["docs_dir"] = str(docs_dir)
        return cast(ReconcileReport, self._call("POST", "/reconcile", body))

    def ask(
        self, question: str, *, user: str, conversation: str | None = None
    ) -> Iterator[AskEvent]:
        body = {"question": question, "user": user, "conversation": conversation, "stream": True}
        return cast(Iterator[AskEvent], self.client.stream("/ask", body))

    def answer(self, question: str, *, user: str) -> Answer:
        final = self._call("POST", "/ask", {"question": question, "user": user})
        return cast(Answer, final["answer"])

    def documents(self) -> Documents:
        return cast(Documents, self._call("GET", "/admin/documents"))

    def conversations(self, user: str) -> list[Conversation]:
        return cast(list[Conversation], self._call("POST", "/conversations", {"user": user}))

    def messages(self, user: str, conversation: str) -> list[dict[str, Any]]:
        body = {"user": user, "conversation": conversation}
        return cast(list[dict[str, Any]], self._call("POST", "/conversations/get", body))

    def rename_conversation(self, user: str, conversation: str, title: str) -> Ok:
        body = {"user": user, "conversation": conversation, "title": title}
        return cast(Ok, self._call("POST", "/conversations/rename", body))

    def delete_conversation(self, user: str, conversation: str) -> Ok:
        body = {"user": user, "conversation": conversation}
        return cast(Ok, self._call("POST", "/conversations/delete", body))

    def feedback(self, user: str, message: int, rating: str, comment: str = "") -> Ok:
        body = {"user": user, "message": message, "rating": rating, "comment": comment}
        return cast(Ok, self._call("POST", "/feedback", body))

    def feedback_stats(self) -> FeedbackStats:
        return cast(FeedbackStats, self._call("GET", "/admin/feedback"))

    def users(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._call("GET", "/admin/users"))

    def add_user(
        self,
        username: str,
        password: str,
        *,
        role: str = "staff",
        groups: Sequence[str] = (),
        operator: str = "",
    ) -> dict[str, Any]:
        body = {
            "username": username,
            "password": password,
            "role": role,
            "groups": list(groups),
            "operator": operator,
        }
        return cast(dict[str, Any], self._call("POST", "/admin/users/create", body))

    def update_user(
        self,
        username: str,
        *,
        role: str | None = None,
        disabled: bool | None = None,
        groups: Sequence[str] | None = None,
        password: str | None = None,
        operator: str = "",
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"username": username, "operator": operator}
        if role is not None:
            body["role"] = role
        if disabled is not None:
            body["disabled"] = disabled
        if groups is not None:
            body["groups"] = list(groups)
        if password:
            body["password"] = password
        return cast(dict[str, Any], self._call("POST", "/admin/users/update", body))

    def groups(self) -> Groups:
        return cast(Groups, self._call("GET", "/admin/groups"))

    def grant(
        self,
        group: str,
        grant: Sequence[str] = (),
        revoke: Sequence[str] = (),
        *,
        operator: str = "",
    ) -> Groups:
        body = {"group": group, "grant": list(grant), "revoke": list(revoke), "operator": operator}
        return cast(Groups, self._call("POST", "/admin/grants", body))

    def models(self) -> Models:
        return cast(Models, self._call("GET", "/admin/models"))

    def model_versions(self) -> list[dict[str, Any]]:
        models = self.models()
        if "registry_error" in models:
            raise ApplianceError(models["registry_error"])
        return list(models.get("versions", []))

    def activate_model(
        self,
        version: str = "",
        *,
        force: bool = False,
        rollback: bool = False,
        operator: str = "",
    ) -> Activated:
        body = {"version": version, "force": force, "rollback": rollback, "operator": operator}
        return cast(Activated, self._call("POST", "/admin/models/activate", body))

    def evaluate(self, gguf: Path, items: Sequence[GoldenItem]) -> dict[str, Any]:
        rows = [asdict(i) if is_dataclass(i) and not isinstance(i, type) else i for i in items]
        body = {"gguf": str(gguf), "items": rows}
        return cast(dict[str, Any], self._call("POST", "/admin/finetune/evaluate", body))

    def backup(self, path: Path, *, include_models: bool = False) -> dict[str, Any]:
        body = {"path": str(path), "include_models": include_models}
        return cast(dict[str, Any], self._call("POST", "/admin/backup", body))

    def chunks(
        self, limit: int, seed: int, collections: frozenset[str] | None = None
    ) -> list[Chunk]:
        body: dict[str, Any] = {"limit": limit, "seed": seed}
        if collections is not None:
            body["collections"] = sorted(collections)
        return cast(list[Chunk], self._call("POST", "/admin/chunks", body))

    def close(self) -> None:
        """Nothing is held between calls: each opens and closes its own connection."""

    def __enter__(self) -> RemoteAppliance:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
