"""One interface to a data folder's appliance, whoever owns the folder.

"Through the running service, or open the data folder directly?" is decided once, by
``appliance.wiring.connect(settings)``: a running core service answers -> ``RemoteAppliance``
(``appliance.remote``, the local API); none does -> ``LocalAppliance`` (``appliance.local``,
which takes the data folder's lock and opens only what an operation needs). Clients (the CLI,
backup, dataset build, the fine-tuning gate, doctor) call the ``Appliance`` protocol and never
branch themselves, as qdrant-client's ``QdrantLocal`` / ``QdrantRemote`` sit behind one base::

    client -> Appliance -+- RemoteAppliance -> ServiceClient -> HTTP -> CoreService routes -+
                         |                                                                  |
                         +- LocalAppliance <------------------------------------------------+
                                 |
                                 +- Ingestion, Answerer, conversations, accounts (opened lazily)

The core service's routes are a thin adapter over its own ``LocalAppliance`` (who may do what,
the audit log and request validation stay in the adapter), so both sides return the same JSON.
The types below are those JSON shapes: ``TypedDict`` only describes the dicts, it never
changes what goes over the wire or out of ``--json``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypedDict

if TYPE_CHECKING:
    from appliance.core.evaluation import GoldenItem

SearchMode = Literal["hybrid", "dense", "sparse"]
Progress = Callable[[str, int, int], None]
"""Called with (relative path, files done, files to do) while a folder is reconciled."""

OPTIMIZE_AFTER = 1000
"""Chunks written or documents removed by one local reconcile after which the index is
optimized (a one-shot ingest is the quiet moment to build the search index)."""


# --- who acts --------------------------------------------------------------------------------


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


def local_user(claimed: Any) -> str:
    """A local operator's name as given by a tool, always in the ``local:`` namespace."""
    from appliance.core.audit import valid_user

    name = str(claimed or "").strip()
    if not name.startswith("local:"):
        name = f"local:{name}" if name else LOCAL.username
    return name if valid_user(name) else LOCAL.username


# --- the JSON shapes ------------------------------------------------------------------------


class Failure(TypedDict):
    path: str
    reason: str


class Stuck(TypedDict):
    path: str
    state: str
    seconds: int


class Status(TypedDict, total=False):
    """``GET /status`` and ``appliance status --json``. Without a service, only the first
    seven keys (read from the ingestion state; ``stuck`` is then always empty)."""

    collection: str
    documents: int
    chunks: int
    failed: list[Failure]
    in_progress: list[str]
    stuck: list[Stuck]
    held_deletions: int | str | None
    paused: bool
    parsing: dict[str, Any] | None
    watcher: dict[str, Any]
    service: dict[str, Any]
    docs_dir: str
    switching_from: str | None
    answering: bool


class Hit(TypedDict):
    """One search result (``Indexer.search``)."""

    path: str | None
    page: int | None
    heading: str | None
    score: float
    text: str
    start: int | None
    end: int | None
    chunk_index: int | None
    ocr_confidence: float | None


class ReconcileReport(TypedDict):
    """``ingest.pipeline.IngestReport.as_json()``."""

    added: int
    updated: int
    removed: int
    unchanged: int
    failed: int
    chunks: int
    seconds: float
    held_deletions: int
    failures: list[dict[str, str]]


class Answer(TypedDict, total=False):
    """``appliance.answering.Answer.as_json()``; see that class for every field."""

    answer: str
    sources: list[dict[str, Any]]
    abstained: bool
    timings: dict[str, float]
    model: str
    redacted: bool
    claims: list[dict[str, Any]]
    unsupported_claims: list[dict[str, Any]]
    mode: str


class AskEvent(TypedDict, total=False):
    """One event of a streamed answer: ``queue`` (place in line), ``retrieved``, ``token``,
    ..., and last ``answer`` with the checked answer and the conversation it was saved in."""

    type: str
    text: str
    position: int
    model: str
    retrieved: list[Any]
    answer: Answer
    conversation: str | None
    message: int | None


class DocumentRow(TypedDict):
    path: str
    state: str
    reason: str | None
    pages: int | None
    chunks: int
    indexed_at: float | None
    size: int | None


class Documents(Status, total=False):
    """``GET /admin/documents``: the status plus one row per known file."""

    files: list[DocumentRow]


class Conversation(TypedDict):
    id: str
    title: str
    created: float
    updated: float


class Ok(TypedDict):
    ok: bool


class FeedbackStats(TypedDict):
    up: int
    down: int
    by_model: dict[str, dict[str, int]]


class Groups(TypedDict):
    groups: dict[str, list[str]]
    collections: list[str]


class ActiveModel(TypedDict):
    name: str | None
    version: str
    backend: str
    origin: str


class Models(TypedDict, total=False):
    """``GET /admin/models``."""

    active: ActiveModel
    embedding: str
    feedback: FeedbackStats | None
    switch_error: str | None
    loaded_versions: list[Any]
    """The registry versions held open to answer (audience-aware serving)."""
    versions: list[dict[str, Any]]
    registry_error: str


class Activated(TypedDict):
    active: str
    switch_error: str | None


class Chunk(TypedDict):
    """``finetune.synthetic.SourceChunk.as_json()``."""

    chunk_id: str
    file: str
    location: str
    text: str


# --- the interface ---------------------------------------------------------------------------


class Appliance(Protocol):
    """What every client of a data folder may do, local or through the running service.

    Restoring a backup is deliberately not an operation: it replaces the data folder itself,
    which no running service may do to the folder it owns. ``appliance restore`` asks
    ``wiring.stopped(settings, ...)`` for the folder instead, which refuses with
    ``StoreLockedError`` ("stop it before restoring") while a core service answers."""

    kind: Literal["local", "remote"]
    """Where the operations run; clients only name it in reports (``chunks_read_from``)."""

    def status(self) -> Status: ...

    def search(
        self, queries: Sequence[str], k: int = 5, mode: SearchMode = "hybrid"
    ) -> list[list[Hit]]:
        """One result list per query, in order."""
        ...

    def reconcile(
        self,
        docs_dir: Path | None = None,
        *,
        confirm_deletions: bool = False,
        progress: Progress | None = None,
    ) -> ReconcileReport:
        """Make the index equal to the documents folder now (``progress`` only locally)."""
        ...

    def ask(
        self, question: str, *, user: str, conversation: str | None = None
    ) -> Iterator[AskEvent]:
        """The streamed events of one question in a conversation (saved in it)."""
        ...

    def answer(self, question: str, *, user: str) -> Answer:
        """One checked answer (the golden-set evaluation asks this way)."""
        ...

    def documents(self) -> Documents: ...

    def conversations(self, user: str) -> list[Conversation]: ...

    def messages(self, user: str, conversation: str) -> list[dict[str, Any]]: ...

    def rename_conversation(self, user: str, conversation: str, title: str) -> Ok: ...

    def delete_conversation(self, user: str, conversation: str) -> Ok: ...

    def feedback(self, user: str, message: int, rating: str, comment: str = "") -> Ok: ...

    def feedback_stats(self) -> FeedbackStats: ...

    # Changes to accounts, grants and the served model are audited where they are made, in the
    # name of the signed-in admin or, for the host's operator, of ``operator`` (``local:``
    # and the OS user, see ``local_user``).

    def users(self) -> list[dict[str, Any]]: ...

    def add_user(
        self,
        username: str,
        password: str,
        *,
        role: str = "staff",
        groups: Sequence[str] = (),
        operator: str = "",
    ) -> dict[str, Any]:
        """Create an account; the user as ``users()`` lists them."""
        ...

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
        """Change what is given (a new password ends the user's sessions); the user."""
        ...

    def groups(self) -> Groups: ...

    def grant(
        self,
        group: str,
        grant: Sequence[str] = (),
        revoke: Sequence[str] = (),
        *,
        operator: str = "",
    ) -> Groups: ...

    def models(self) -> Models: ...

    def model_versions(self) -> list[dict[str, Any]]:
        """The model registry's versions (``ModelRegistry.versions()``), without loading any
        model (``appliance models list``)."""
        ...

    def activate_model(
        self,
        version: str = "",
        *,
        force: bool = False,
        rollback: bool = False,
        operator: str = "",
    ) -> Activated: ...

    def evaluate(self, gguf: Path, items: Sequence[GoldenItem]) -> dict[str, Any]:
        """The golden set (``appliance.core.evaluation.GoldenItem``) answered with the chat model
        in ``gguf`` over this appliance's index (the fine-tuning gate)."""
        ...

    def backup(self, path: Path, *, include_models: bool = False) -> dict[str, Any]:
        """Write a backup of the data folder to ``path``; its manifest."""
        ...

    def chunks(
        self, limit: int, seed: int, collections: frozenset[str] | None = None
    ) -> list[Chunk]:
        """A seeded sample of indexed chunk texts (synthetic fine-tuning data), of
        ``collections`` only when given (``dataset build --collections``)."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Appliance: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
