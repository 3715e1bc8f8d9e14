"""The indexer: keeps one collection of the vector store exactly equal to the documents folder.

Writing a file's new version (crash-safe at every step, see ``IngestState``):
  1. parse (in the sandbox), chunk, embed what the vector cache lacks;
  2. record the new points as 'pending', then upsert them into the store;
  3. in one transaction make them 'live', mark the path's previous points 'doomed' and the file
     indexed; 4. delete the doomed points from the store, then their rows.
The previous version stays searchable until the new one is complete, and a failed parse leaves
it in place. ``recover()`` (run at every start) deletes what 'pending' and 'doomed' rows name
and then compares the store's point ids with the live rows, so whatever a killed process left
behind, the index again equals the state, and the folder scan makes the state equal the folder.

A full disk pauses ingestion instead of failing files: ENOSPC or EDQUOT from the state, the store
or the parser becomes ``DiskFullError`` out of ``reconcile`` (nothing is marked failed, so nothing
is lost), ``status()["paused"]`` says why, and the next reconcile first runs ``recover()`` and then
carries on. Qdrant Edge 0.9 writes through memory maps and dies with SIGBUS instead of raising when
the disk fills under it, so the indexer also refuses to write while less than ``min_free_bytes``
(plus a margin for the write in hand) is free where the state lives.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from appliance.core.audience import collection_of
from appliance.core.errors import IngestError, ParseError
from appliance.core.protocols import (
    Chunk,
    Embedder,
    Hit,
    ParsedDocument,
    Point,
    SearchMode,
    Section,
    SparseEncoder,
    VectorStore,
)
from appliance.core.settings import ChunkingSettings, IngestSettings
from ingest.chunking import chunk_sections
from ingest.disk_guard import (
    MIN_FREE_BYTES,
    DiskFullError,
    check_space,
    disk_full_reason,
    free_bytes,
)
from ingest.identity import file_name_terms, identity_line
from ingest.retrieval import TABLE_KIND, TEXT_KIND, retrieve
from ingest.safe_open import Staging, UnsafeDocument
from ingest.scan import FoundFile, walk
from ingest.state import ChunkRow, FileRow, IngestState
from ingest.status import HELD_DELETIONS, index_status

log = logging.getLogger(__name__)

_POINT_NS = uuid.UUID("6f1c2f0e-8d7a-4b8e-9a51-3c0d2b7e9f10")
CACHE_TTL_S = 24 * 3600


class Parser(Protocol):
    def parse(self, path: Path) -> ParsedDocument: ...


@runtime_checkable
class ReportsProgress(Protocol):
    """A parser that can say how far it is in a long file (the sandbox, while OCR runs)."""

    def progress(self) -> dict[str, Any] | None: ...


@dataclass
class IngestReport:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: int = 0
    chunks: int = 0
    seconds: float = 0.0
    held_deletions: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


ProgressFn = Callable[[str, int, int], None]
"""Called with (relative path, files done, files to do)."""


def display_path(rel: str) -> str:
    """A path that SQLite and JSON can hold even when the name is not valid UTF-8."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class _Prepared:
    """A file ready to write: its chunks with their dense vectors."""

    found: FoundFile
    sha256: str
    identity: str
    pages: int | None
    chunks: list[Chunk]
    text_keys: list[str]
    vectors: list[list[float]]


class Indexer:
    """Indexes one folder into one store collection, tracking it in ``IngestState``."""

    def __init__(
        self,
        *,
        docs_dir: Path,
        state: IngestState,
        store: VectorStore,
        embedder: Embedder,
        sparse: SparseEncoder,
        parser: Parser,
        suffixes: frozenset[str],
        ingest: IngestSettings,
        chunking: ChunkingSettings,
        min_free_bytes: int = MIN_FREE_BYTES,
        staging: Staging | None = None,
    ) -> None:
        self.docs_dir = docs_dir
        self.state = state
        self.store = store
        self.embedder = embedder
        self.sparse = sparse
        self.parser = parser
        self.suffixes = suffixes
        self.settings = ingest
        self.chunking = chunking
        self.collection = store.name
        # One writer at a time: the watcher thread and API calls share the indexer.
        self._write_lock = threading.RLock()
        self._interrupted = threading.Event()
        self.min_free_bytes = min_free_bytes
        self.paused: str | None = None
        """Why ingestion is paused ("disk full: ..."), or None while it runs."""
        # Each document is opened once and copied here while it is hashed; the parser reads
        # the copy (ingest.safe_open): the parser sandbox's own folder, the only one its
        # confined worker may read. Without one, the indexer keeps a folder of its own.
        if staging is None:
            staging = Staging()
            weakref.finalize(self, staging.close)
        self.staging = staging
        self._staged_from: dict[str, str] = {}
        """Staged copy -> the document it was made from, while it is in hand."""

    @contextlib.contextmanager
    def writes_held(self) -> Iterator[None]:
        """Hold every write (waits for the batch in hand) and flush the store, so that the
        state and the index on disk agree while the caller copies them (a backup)."""
        with self._write_lock:
            self.store.flush()
            yield

    # --- disk space --------------------------------------------------------------------------

    def free_bytes(self) -> int | None:
        """Free bytes where the ingestion state lives (the data folder), None if unknown."""
        return free_bytes(self.state.path.parent)

    def has_space(self, extra: int = 0) -> bool:
        free = self.free_bytes()
        return free is None or free >= self.min_free_bytes + extra

    def _check_space(self, extra: int = 0) -> None:
        """Refuse a write that could fill the disk under the store (see the module docstring)."""
        check_space(self.state.path.parent, self.min_free_bytes + extra)

    def _pause(self, exc: BaseException, reason: str) -> DiskFullError:
        message = reason if reason.startswith("disk full") else f"disk full: {reason}"
        if self.paused is None:
            # Once per episode: the watcher retries every few seconds until space is back.
            log.error("ingestion paused: %s", message)
        self.paused = message
        return exc if isinstance(exc, DiskFullError) else DiskFullError(message)

    def _resume(self) -> None:
        if self.paused is not None:
            # A write cut short by the full disk may have left pending rows and points.
            self.recover()
            log.warning("disk space is available again: ingestion resumed")
            self.paused = None

    def interrupt(self) -> None:
        """Stop a running reconcile after the file in hand (the rest stays queued)."""
        self._interrupted.set()

    # --- texts and ids -----------------------------------------------------------------------

    def dense_text(self, identity: str, chunk: Chunk) -> str:
        head = f"{identity}\n{chunk.heading}" if chunk.heading else identity
        return f"{head}\n{chunk.text}" if head else chunk.text

    def sparse_text(self, rel: str, identity: str, chunk: Chunk) -> str:
        return f"{file_name_terms(rel)}\n{self.dense_text(identity, chunk)}"

    def _room(self, identity: str) -> Callable[[Section], int] | None:
        """Tokens left for a chunk in the model's window once its identity line and heading
        path are in front (a longer text would be cut at the end when embedded)."""
        window = getattr(self.embedder, "max_tokens", None)
        if not window:
            return None
        spans = self.embedder.token_spans
        fixed = int(window) - len(spans(identity)) - 4  # special tokens and line breaks
        return lambda section: fixed - (len(spans(section.heading)) if section.heading else 0)

    def text_key(self, dense_text: str) -> str:
        return hashlib.sha256(f"{self.embedder.model_id}\0{dense_text}".encode()).hexdigest()

    def point_id(self, rel: str, sha256: str, index: int) -> str:
        return str(uuid.uuid5(_POINT_NS, f"{self.collection}\0{rel}\0{sha256}\0{index}"))

    # --- recovery ----------------------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """Undo what a killed process left half done, then make the store equal the live rows."""
        with self._write_lock:
            pending = self.state.chunk_ids(self.collection, "pending")
            doomed = self.state.chunk_ids(self.collection, "doomed")
            self.store.delete(pending + doomed)
            self.store.flush()
            self.state.drop_chunks(self.collection, pending + doomed)
            live = set(self.state.chunk_ids(self.collection, "live"))
            in_store = self.store.ids()
            stale = sorted(in_store - live)
            missing = live - in_store
            self.store.delete(stale)
            broken = self.state.paths_of_points(self.collection, missing)
            # A file whose removal was cut short (its points doomed and deleted above) or whose
            # rows disagree with its chunk count is indexed again from the folder.
            live_counts = self.state.live_counts(self.collection)
            broken |= {
                rel
                for rel, row in self.state.files(self.collection).items()
                if row.indexed_sha256 is not None and live_counts.get(rel, 0) != row.chunks
            }
            for rel in broken:
                self.state.invalidate_path(self.collection, rel)
            if broken:
                redo = self.state.chunk_ids(self.collection, "doomed")
                self.store.delete(redo)
                self.state.drop_chunks(self.collection, redo)
            self.store.flush()
            for rel, row in self.state.files(self.collection).items():
                if row.state in ("parsing", "embedding"):
                    self.state.set_file_state(self.collection, rel, "queued")
            result = {
                "pending": len(pending),
                "doomed": len(doomed),
                "stale": len(stale),
                "reindex": len(broken),
            }
            if any(result.values()):
                log.warning("recovered an interrupted ingestion: %s", result)
            return result

    # --- scanning ----------------------------------------------------------------------------

    def reconcile(
        self,
        *,
        confirm_deletions: bool = False,
        progress: ProgressFn | None = None,
        only: Iterable[str] | None = None,
    ) -> IngestReport:
        """Make the index equal the folder (or the given relative paths of it)."""
        start = time.monotonic()
        report = IngestReport()
        with self._write_lock:
            try:
                self._reconcile(report, confirm_deletions, progress, only)
            except Exception as exc:
                reason = disk_full_reason(exc)
                if reason is None:
                    raise
                raise self._pause(exc, reason) from exc
        report.seconds = round(time.monotonic() - start, 3)
        return report

    def _reconcile(
        self,
        report: IngestReport,
        confirm_deletions: bool,
        progress: ProgressFn | None,
        only: Iterable[str] | None,
    ) -> None:
        """The body of ``reconcile``, run under the write lock."""
        if self.paused is not None:
            self._check_space()
            self._resume()
        if not self.docs_dir.is_dir():
            raise IngestError(f"documents folder {self.docs_dir} does not exist or is not a folder")
        known = self.state.files(self.collection)
        wanted = set(only) if only is not None else None
        found: dict[str, FoundFile] = {}
        rejected: dict[str, str] = {}
        for item in walk(self.docs_dir, self.suffixes):
            if isinstance(item, tuple):
                rel, reason = item
                if wanted is None or rel in wanted:
                    rejected[rel] = reason
                continue
            if wanted is None or item.rel in wanted:
                found[item.rel] = item
        todo: list[FoundFile] = []
        for rel, item in found.items():
            row = known.get(rel)
            if row is not None and row.size == item.size and row.mtime_ns == item.mtime_ns:
                if row.state == "failed":
                    report.failed += 1  # retried when the file changes
                    report.failures.append({"path": rel, "reason": row.reason or "failed"})
                    continue
                if row.indexed_sha256 is not None and row.indexed_sha256 == row.sha256:
                    report.unchanged += 1
                    continue
            todo.append(item)
        scope = known if wanted is None else {r: known[r] for r in wanted if r in known}
        # A rejected file, or one whose name is not UTF-8 (its row is under the display
        # form), is still in the folder: its failure row stays, or `status` would lose the
        # reason on every other scan. A rejected file's earlier indexed version does go.
        shown_rejected = {display_path(rel) for rel in rejected}
        present = shown_rejected | {display_path(rel) for rel in found}
        gone = sorted(
            rel
            for rel in scope
            if rel not in present
            or (rel in shown_rejected and scope[rel].indexed_sha256 is not None)
        )
        self._index_files(todo, known, report, progress)
        self._remove_files(gone, known, report, confirm_deletions, full=wanted is None)
        for rel, reason in rejected.items():
            self._reject(rel, reason, report)
        self.store.flush()
        if wanted is None:
            self.state.prune_cache(CACHE_TTL_S)

    def _reject(self, rel: str, reason: str, report: IngestReport) -> None:
        shown = display_path(rel)
        row = self.state.file(self.collection, shown)
        if row is None or row.state != "failed" or row.reason != reason:
            self.state.set_file_state(self.collection, shown, "failed", reason=reason)
        report.failed += 1
        report.failures.append({"path": shown, "reason": reason})

    def _remove_files(
        self,
        gone: list[str],
        known: dict[str, FileRow],
        report: IngestReport,
        confirmed: bool,
        *,
        full: bool,
    ) -> None:
        gone_set = set(gone)
        # New paths were indexed before this: a gone path whose content lives on under another
        # path was renamed or moved, and removing it loses nothing.
        living = {
            row.indexed_sha256
            for rel, row in self.state.files(self.collection).items()
            if rel not in gone_set and row.indexed_sha256 is not None
        }
        indexed = [
            rel
            for rel in gone
            if known[rel].indexed_sha256 is not None and known[rel].indexed_sha256 not in living
        ]
        total = sum(1 for row in known.values() if row.indexed_sha256 is not None)
        s = self.settings
        if (
            not confirmed
            and total >= s.mass_delete_min_files
            and len(indexed) > s.mass_delete_fraction * total
        ):
            # A share that dropped or a folder emptied by mistake looks like this: hold it.
            report.held_deletions = len(indexed)
            self.state.set_meta(HELD_DELETIONS, f"{len(indexed)}/{total}")
            log.error(
                "refusing to remove %d of %d indexed documents without confirmation; "
                "run `appliance ingest --confirm-deletions` if they were really deleted",
                len(indexed),
                total,
            )
            held = set(indexed)
            gone = [rel for rel in gone if rel not in held]
        elif full or confirmed:
            # Only a whole-folder scan (or a confirmation) knows that nothing is held any more.
            self.state.set_meta(HELD_DELETIONS, None)
        if gone:
            self._check_space()  # a deletion, too, appends to the store's write-ahead log
        for rel in gone:
            self.remove(rel)
            if known[rel].indexed_sha256 is not None:
                report.removed += 1

    def remove(self, rel: str) -> None:
        """Remove a file's points and its state."""
        with self._write_lock:
            doomed = self.state.doom_path(self.collection, rel)
            self.store.delete(doomed)
            self.state.drop_chunks(self.collection, doomed)
            self.state.forget_file(self.collection, rel)

    # --- indexing ----------------------------------------------------------------------------

    def _index_files(
        self,
        todo: list[FoundFile],
        known: dict[str, FileRow],
        report: IngestReport,
        progress: ProgressFn | None,
    ) -> None:
        if not todo:
            return
        for item in todo:
            # The stat is recorded only with an outcome (indexed, failed): a process killed
            # before that must not mistake the file for an unchanged one.
            self.state.set_file_state(self.collection, display_path(item.rel), "queued")
        # Parse the next files while this one is embedded: the parser is another process.
        prepared: queue.Queue[tuple[FoundFile, _Prepared | str | Exception | None]] = queue.Queue(
            maxsize=2
        )
        stop = threading.Event()

        def produce() -> None:
            for item in todo:
                if stop.is_set() or self._interrupted.is_set():
                    return
                try:
                    prepared.put((item, self._prepare_lexical(item)))
                except Exception as exc:  # reported per file; never stops the batch
                    if disk_full_reason(exc) is not None:
                        # not the file's fault: it must stay queued, never be marked failed
                        prepared.put((item, exc))
                        return
                    log.exception("preparing %s failed", display_path(item.rel))
                    prepared.put((item, f"internal error: {type(exc).__name__}: {exc}"))

        producer = threading.Thread(target=produce, name="ingest-parse", daemon=True)
        producer.start()
        try:
            for done in range(len(todo)):
                if self._interrupted.is_set():
                    break
                item, result = prepared.get()
                if progress:
                    progress(item.rel, done, len(todo))
                if isinstance(result, Exception):
                    raise result
                if isinstance(result, str):
                    if disk_full_reason(IngestError(result)) is not None:
                        raise DiskFullError(f"disk full: {result}")
                    self._fail(item, result, report)
                    continue
                if result is None:  # unchanged content (a touch)
                    report.unchanged += 1
                    continue
                self._check_space(self._write_estimate(result))
                try:
                    ready = self._embed(result)
                    self._write(ready)
                except ParseError as exc:
                    if disk_full_reason(exc) is not None:
                        raise
                    self._fail(item, exc.reason, report)
                    continue
                row = known.get(item.rel)
                if row is not None and row.indexed_sha256 is not None:
                    report.updated += 1
                else:
                    report.added += 1
                report.chunks += len(ready.chunks)
            if progress:
                progress("", len(todo), len(todo))
        finally:
            stop.set()
            while producer.is_alive():
                with contextlib.suppress(queue.Empty):
                    prepared.get(timeout=0.1)
            producer.join()

    def _write_estimate(self, prep: _Prepared) -> int:
        """Bytes a file's write may add: its text in the state, the payload and the BM25 terms,
        and each vector in the cache and the store (a generous over-estimate)."""
        return 4 * sum(len(c.text) for c in prep.chunks) + 8 * self.embedder.dim * len(prep.chunks)

    def _fail(self, item: FoundFile, reason: str, report: IngestReport) -> None:
        rel = display_path(item.rel)
        log.warning("cannot ingest %s: %s", rel, reason)
        # The failed version's stat is kept so it is retried only when the file changes.
        self.state.set_file_state(
            self.collection, rel, "failed", size=item.size, mtime_ns=item.mtime_ns, reason=reason
        )
        report.failed += 1
        report.failures.append({"path": rel, "reason": reason})

    def _prepare_lexical(self, item: FoundFile) -> _Prepared | str | None:
        """Hash, then reuse an indexed copy's chunks or parse and chunk. Returns a failure
        reason as a string, or None when the content is already indexed under this path."""
        rel = item.rel
        if display_path(rel) != rel:
            return "file name is not valid UTF-8"
        limit = int(self.settings.max_file_mb * 1024 * 1024)
        if item.size > limit:
            return (
                f"file too large ({item.size / 1048576:.1f} MB > "
                f"{self.settings.max_file_mb:g} MB limit)"
            )
        try:
            sha, staged = self.staging.copy(self.docs_dir, rel, limit=limit)
        except UnsafeDocument as exc:
            return exc.reason
        except OSError as exc:
            return f"cannot read file: {exc.strerror}"
        self._staged_from[str(staged)] = rel
        try:
            return self._prepare_staged(item, sha, staged)
        finally:
            self._staged_from.pop(str(staged), None)
            staged.unlink(missing_ok=True)

    def _prepare_staged(self, item: FoundFile, sha: str, staged: Path) -> _Prepared | str | None:
        rel = item.rel
        row = self.state.file(self.collection, rel)
        if row is not None and row.indexed_sha256 == sha:
            self.state.touch_file(self.collection, rel, item.size, item.mtime_ns)
            self.state.set_file_state(self.collection, rel, "indexed", sha256=sha)
            return None
        self.state.set_file_state(self.collection, rel, "parsing", sha256=sha)
        copies = self.state.live_chunks_of_hash(self.collection, sha)
        doc = self.state.get_doc(sha)
        if copies and doc is not None:
            # A rename, a move or a copy: same content, so the same chunks and vectors.
            identity, pages = doc
            chunks = [c.chunk for c in copies]
            keys = [c.text_key for c in copies]
        else:
            try:
                parsed = self.parser.parse(staged)
            except ParseError as exc:
                return exc.reason
            identity = identity_line(parsed)
            pages = parsed.pages
            chunks = chunk_sections(
                parsed.sections,
                self.embedder.token_spans,
                self.chunking.max_tokens,
                self.chunking.overlap_tokens,
                room=self._room(identity),
            )
            if not chunks:
                return "empty document: no extractable text"
            keys = [self.text_key(self.dense_text(identity, c)) for c in chunks]
        return _Prepared(item, sha, identity, pages, chunks, keys, [])

    def _embed(self, prep: _Prepared) -> _Prepared:
        self.state.set_file_state(self.collection, prep.found.rel, "embedding")
        cached = self.state.get_vectors(prep.text_keys)
        missing = {
            key: self.dense_text(prep.identity, chunk)
            for key, chunk in zip(prep.text_keys, prep.chunks, strict=True)
            if key not in cached
        }
        if missing:
            keys = list(missing)
            vectors = self.embedder.embed([missing[k] for k in keys])
            fresh = dict(zip(keys, vectors, strict=True))
            self.state.put_vectors(fresh.items())
            cached.update(fresh)
        return _Prepared(
            prep.found,
            prep.sha256,
            prep.identity,
            prep.pages,
            prep.chunks,
            prep.text_keys,
            [cached[k] for k in prep.text_keys],
        )

    def _write(self, prep: _Prepared) -> None:
        rel = prep.found.rel
        self.state.put_doc(prep.sha256, prep.identity, prep.pages)
        rows = [
            ChunkRow(self.point_id(rel, prep.sha256, c.index), rel, prep.sha256, c, key)
            for c, key in zip(prep.chunks, prep.text_keys, strict=True)
        ]
        points = [
            Point(
                id=row.point_id,
                dense=vector,
                sparse=self.sparse.embed_document(self.sparse_text(rel, prep.identity, row.chunk)),
                payload=self._payload(rel, prep, row.chunk),
            )
            for row, vector in zip(rows, prep.vectors, strict=True)
        ]
        self.state.add_pending(self.collection, rows)
        for i in range(0, len(points), 256):
            self.store.upsert(points[i : i + 256])
        doomed = self.state.commit_file(
            self.collection,
            rel,
            prep.sha256,
            [r.point_id for r in rows],
            size=prep.found.size,
            mtime_ns=prep.found.mtime_ns,
            pages=prep.pages,
        )
        self.store.delete(doomed)
        self.state.drop_chunks(self.collection, doomed)

    def _payload(self, rel: str, prep: _Prepared, chunk: Chunk) -> dict[str, Any]:
        return {
            "path": rel,
            "collection": collection_of(rel),
            "doc_hash": prep.sha256,
            "chunk_index": chunk.index,
            "page": chunk.page,
            "heading": chunk.heading,
            "start": chunk.start,
            "end": chunk.end,
            "text": chunk.text,
            "identity": prep.identity,
            "ocr_confidence": chunk.ocr_confidence,
            "kind": TABLE_KIND if chunk.table else TEXT_KIND,
        }

    # --- reading -----------------------------------------------------------------------------

    def retrieve(
        self,
        query: str,
        k: int,
        *,
        mode: SearchMode = "hybrid",
        where: Mapping[str, Sequence[str]] | None = None,
        embedder: Embedder | None = None,
    ) -> list[Hit]:
        """The top ``k`` chunks for ``query`` under ``where`` (``ingest.retrieval.retrieve``
        over this indexer's store and encoders): what answering retrieves through.
        ``embedder``: this indexer's model behind a cache of the caller's (answering's)."""
        return retrieve(
            self.store, embedder or self.embedder, self.sparse, query, k, mode=mode, where=where
        )

    def status(self) -> dict[str, Any]:
        out = index_status(self.state, self.collection, stuck_after_s=self.settings.stuck_after_s)
        out["paused"] = self.paused
        out["parsing"] = self._parse_progress()
        return out

    def _parse_progress(self) -> dict[str, Any] | None:
        """The file being OCR'd, as ``{"path", "pages_done", "pages"}`` (None otherwise)."""
        if not isinstance(self.parser, ReportsProgress):
            return None
        progress = self.parser.progress()
        if progress is None:
            return None
        # The parser reads a staged copy: name the document it was made from.
        rel = self._staged_from.get(str(progress["path"]))
        if rel is None:
            path = Path(progress["path"])
            with contextlib.suppress(ValueError):
                path = path.relative_to(self.docs_dir.absolute())
            rel = str(path)
        return {**progress, "path": display_path(rel)}
