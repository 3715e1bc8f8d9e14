"""Ingestion state in SQLite, next to the index: the source of truth for what the index holds.

    files    one row per (collection, path): size, mtime, content hash, state, reason, and the hash
             whose chunks are live in the index (its last good version)
    chunks   one row per point: 'pending' (being written), 'live', or 'doomed' (being removed),
             with the chunk's text, offsets, page and heading, so a renamed or copied file is
             re-indexed from here without parsing or embedding
    docs     the identity line of each indexed content hash
    vectors  dense vectors by text key (model + embedded text): identical text is embedded once
    meta     small key/values: the active collection, held deletions

Writes happen in short transactions in an order that lets ``recover`` finish or undo any step
a killed process left half done (see ``ingest.pipeline``).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.core import sqlite
from appliance.core.protocols import Chunk

ACTIVE_COLLECTION = "active_collection"
"""Meta key: the collection that serves searches (a new one is filled beside it, then switched)."""
ACTIVE_MODEL_PATH = "active_model_path"
ACTIVE_MODEL_ID = "active_model_id"
"""Meta keys: the embedding model that filled the active collection."""

FILE_STATES = ("queued", "parsing", "embedding", "indexed", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    collection TEXT NOT NULL, path TEXT NOT NULL, size INTEGER, mtime_ns INTEGER, sha256 TEXT,
    state TEXT NOT NULL, reason TEXT, state_since REAL NOT NULL,
    indexed_sha256 TEXT, indexed_at REAL, chunks INTEGER NOT NULL DEFAULT 0, pages INTEGER,
    PRIMARY KEY (collection, path));
CREATE TABLE IF NOT EXISTS chunks (
    collection TEXT NOT NULL, point_id TEXT NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL,
    idx INTEGER NOT NULL, status TEXT NOT NULL, text_key TEXT NOT NULL, text TEXT NOT NULL,
    start INTEGER NOT NULL, end_ INTEGER NOT NULL, page INTEGER, heading TEXT,
    ocr_confidence REAL, is_table INTEGER,
    PRIMARY KEY (collection, point_id));
CREATE INDEX IF NOT EXISTS chunks_by_path ON chunks (collection, path, status);
CREATE INDEX IF NOT EXISTS chunks_by_hash ON chunks (collection, sha256, status);
CREATE INDEX IF NOT EXISTS chunks_by_status ON chunks (collection, status);
CREATE TABLE IF NOT EXISTS docs (
    sha256 TEXT PRIMARY KEY, identity TEXT NOT NULL, pages INTEGER, last_used REAL NOT NULL);
CREATE TABLE IF NOT EXISTS vectors (
    text_key TEXT PRIMARY KEY, dense BLOB NOT NULL, last_used REAL NOT NULL);
"""


@dataclass(frozen=True)
class FileRow:
    path: str
    size: int | None
    mtime_ns: int | None
    sha256: str | None
    state: str
    reason: str | None
    state_since: float
    indexed_sha256: str | None
    indexed_at: float | None
    chunks: int
    pages: int | None


@dataclass(frozen=True)
class ChunkRow:
    point_id: str
    path: str
    sha256: str
    chunk: Chunk
    text_key: str


def _pack(vector: Sequence[float]) -> bytes:
    return array("f", vector).tobytes()


def _unpack(blob: bytes) -> list[float]:
    out = array("f")
    out.frombytes(blob)
    return out.tolist()


class IngestState:
    """The SQLite ingestion state. Thread-safe; one connection guarded by a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path  # the indexer watches the free space of this file's disk
        # A commit here is a promise about the index: it must survive a power loss too.
        self._db = sqlite.connect(path, _SCHEMA, durable=True)
        self._lock = threading.RLock()
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """A state written before a column was added gets it (NULL in the existing rows)."""
        have = {row[1] for row in self._query("PRAGMA table_info(chunks)")}
        if "ocr_confidence" not in have:
            with self.transaction() as db:
                db.execute("ALTER TABLE chunks ADD COLUMN ocr_confidence REAL")
        if "is_table" not in have:
            with self.transaction() as db:
                db.execute("ALTER TABLE chunks ADD COLUMN is_table INTEGER")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with sqlite.write(self._db, self._lock) as db:
            yield db

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # --- meta --------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str | None) -> None:
        with self.transaction() as db:
            if value is None:
                db.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # --- files -------------------------------------------------------------------------------

    def files(self, collection: str) -> dict[str, FileRow]:
        rows = self._query(
            "SELECT path, size, mtime_ns, sha256, state, reason, state_since, indexed_sha256, "
            "indexed_at, chunks, pages FROM files WHERE collection = ?",
            (collection,),
        )
        return {r[0]: FileRow(*r) for r in rows}

    def file(self, collection: str, path: str) -> FileRow | None:
        rows = self._query(
            "SELECT path, size, mtime_ns, sha256, state, reason, state_since, indexed_sha256, "
            "indexed_at, chunks, pages FROM files WHERE collection = ? AND path = ?",
            (collection, path),
        )
        return FileRow(*rows[0]) if rows else None

    def set_file_state(
        self,
        collection: str,
        path: str,
        state: str,
        *,
        size: int | None = None,
        mtime_ns: int | None = None,
        sha256: str | None = None,
        reason: str | None = None,
    ) -> None:
        """Record a file's progress; keeps what is known of its indexed version."""
        assert state in FILE_STATES, state
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO files (collection, path, size, mtime_ns, sha256, state, reason, "
                "state_since) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (collection, path) DO "
                "UPDATE SET size = coalesce(excluded.size, size), "
                "mtime_ns = coalesce(excluded.mtime_ns, mtime_ns), "
                "sha256 = coalesce(excluded.sha256, sha256), state = excluded.state, "
                "reason = excluded.reason, state_since = excluded.state_since",
                (collection, path, size, mtime_ns, sha256, state, reason, now),
            )

    def touch_file(self, collection: str, path: str, size: int, mtime_ns: int) -> None:
        """The file changed on disk but not in content (same hash): remember its new stat."""
        with self.transaction() as db:
            db.execute(
                "UPDATE files SET size = ?, mtime_ns = ? WHERE collection = ? AND path = ?",
                (size, mtime_ns, collection, path),
            )

    def forget_file(self, collection: str, path: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM files WHERE collection = ? AND path = ?", (collection, path))

    # --- chunks ------------------------------------------------------------------------------

    def live_chunks_of_hash(self, collection: str, sha256: str) -> list[ChunkRow]:
        """The chunks of one indexed content, from whichever path holds it first."""
        rows = self._query(
            "SELECT path FROM chunks WHERE collection = ? AND sha256 = ? AND status = 'live' "
            "LIMIT 1",
            (collection, sha256),
        )
        if not rows:
            return []
        return self.live_chunks_of_path(collection, rows[0][0], sha256)

    def live_chunks_of_path(
        self, collection: str, path: str, sha256: str | None = None
    ) -> list[ChunkRow]:
        sql = (
            "SELECT point_id, path, sha256, idx, text, start, end_, page, heading, text_key, "
            "ocr_confidence, is_table "
            "FROM chunks WHERE collection = ? AND path = ? AND status = 'live'"
        )
        args: list[Any] = [collection, path]
        if sha256 is not None:
            sql += " AND sha256 = ?"
            args.append(sha256)
        rows = self._query(sql + " ORDER BY idx", args)
        return [
            ChunkRow(
                point_id=r[0],
                path=r[1],
                sha256=r[2],
                chunk=Chunk(
                    index=r[3],
                    text=r[4],
                    start=r[5],
                    end=r[6],
                    page=r[7],
                    heading=r[8],
                    ocr_confidence=r[10],
                    table=bool(r[11]),
                ),
                text_key=r[9],
            )
            for r in rows
        ]

    def add_pending(self, collection: str, rows: Iterable[ChunkRow]) -> None:
        """Step 1 of a write: record the points about to be upserted."""
        with self.transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO chunks (collection, point_id, path, sha256, idx, status, "
                "text_key, text, start, end_, page, heading, ocr_confidence, is_table) "
                "VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        collection,
                        r.point_id,
                        r.path,
                        r.sha256,
                        r.chunk.index,
                        r.text_key,
                        r.chunk.text,
                        r.chunk.start,
                        r.chunk.end,
                        r.chunk.page,
                        r.chunk.heading,
                        r.chunk.ocr_confidence,
                        int(r.chunk.table),
                    )
                    for r in rows
                ],
            )

    def commit_file(
        self,
        collection: str,
        path: str,
        sha256: str,
        point_ids: Sequence[str],
        *,
        size: int,
        mtime_ns: int,
        pages: int | None,
    ) -> list[str]:
        """Step 2: the new points are in the store; make them live, doom the path's old ones,
        and mark the file indexed, in one transaction. Returns the doomed point ids."""
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "UPDATE chunks SET status = 'live' WHERE collection = ? AND point_id = ?",
                [(collection, pid) for pid in point_ids],
            )
            keep = set(point_ids)
            old = [
                r[0]
                for r in db.execute(
                    "SELECT point_id FROM chunks WHERE collection = ? AND path = ? "
                    "AND status = 'live'",
                    (collection, path),
                )
                if r[0] not in keep
            ]
            db.executemany(
                "UPDATE chunks SET status = 'doomed' WHERE collection = ? AND point_id = ?",
                [(collection, pid) for pid in old],
            )
            db.execute(
                "INSERT INTO files (collection, path, size, mtime_ns, sha256, state, reason, "
                "state_since, indexed_sha256, indexed_at, chunks, pages) "
                "VALUES (?, ?, ?, ?, ?, 'indexed', NULL, ?, ?, ?, ?, ?) "
                "ON CONFLICT (collection, path) DO UPDATE SET size = excluded.size, "
                "mtime_ns = excluded.mtime_ns, sha256 = excluded.sha256, state = 'indexed', "
                "reason = NULL, state_since = excluded.state_since, "
                "indexed_sha256 = excluded.indexed_sha256, indexed_at = excluded.indexed_at, "
                "chunks = excluded.chunks, pages = excluded.pages",
                (collection, path, size, mtime_ns, sha256, now, sha256, now, len(point_ids), pages),
            )
        return old

    def doom_path(self, collection: str, path: str) -> list[str]:
        """Step 1 of a removal: the path's live points are to be deleted."""
        with self.transaction() as db:
            ids = [
                r[0]
                for r in db.execute(
                    "SELECT point_id FROM chunks WHERE collection = ? AND path = ? "
                    "AND status = 'live'",
                    (collection, path),
                )
            ]
            db.execute(
                "UPDATE chunks SET status = 'doomed' WHERE collection = ? AND path = ? "
                "AND status = 'live'",
                (collection, path),
            )
        return ids

    def drop_chunks(self, collection: str, point_ids: Sequence[str]) -> None:
        """The last step: the points are gone from the store."""
        with self.transaction() as db:
            db.executemany(
                "DELETE FROM chunks WHERE collection = ? AND point_id = ?",
                [(collection, pid) for pid in point_ids],
            )

    def chunk_ids(self, collection: str, status: str) -> list[str]:
        return [
            r[0]
            for r in self._query(
                "SELECT point_id FROM chunks WHERE collection = ? AND status = ?",
                (collection, status),
            )
        ]

    def paths_of_points(self, collection: str, point_ids: Iterable[str]) -> set[str]:
        wanted = set(point_ids)
        return {
            r[1]
            for r in self._query(
                "SELECT point_id, path FROM chunks WHERE collection = ? AND status = 'live'",
                (collection,),
            )
            if r[0] in wanted
        }

    def invalidate_path(self, collection: str, path: str) -> None:
        """Forget what is indexed for a path (its points are incomplete): it will be re-indexed."""
        with self.transaction() as db:
            db.execute(
                "UPDATE chunks SET status = 'doomed' WHERE collection = ? AND path = ? "
                "AND status = 'live'",
                (collection, path),
            )
            db.execute(
                "UPDATE files SET indexed_sha256 = NULL, chunks = 0, state = 'queued', "
                "state_since = ? WHERE collection = ? AND path = ?",
                (time.time(), collection, path),
            )

    def live_counts(self, collection: str) -> dict[str, int]:
        """Live chunks per path."""
        rows = self._query(
            "SELECT path, count(*) FROM chunks WHERE collection = ? AND status = 'live' "
            "GROUP BY path",
            (collection,),
        )
        return {r[0]: int(r[1]) for r in rows}

    def counts(self, collection: str) -> tuple[int, int]:
        """(indexed documents, live chunks)."""
        docs = self._query(
            "SELECT count(*) FROM files WHERE collection = ? AND indexed_sha256 IS NOT NULL",
            (collection,),
        )[0][0]
        chunks = self._query(
            "SELECT count(*) FROM chunks WHERE collection = ? AND status = 'live'", (collection,)
        )[0][0]
        return int(docs), int(chunks)

    def drop_collection(self, collection: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM chunks WHERE collection = ?", (collection,))
            db.execute("DELETE FROM files WHERE collection = ?", (collection,))

    # --- identities and vectors --------------------------------------------------------------

    def put_doc(self, sha256: str, identity: str, pages: int | None) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO docs VALUES (?, ?, ?, ?)",
                (sha256, identity, pages, time.time()),
            )

    def get_doc(self, sha256: str) -> tuple[str, int | None] | None:
        rows = self._query("SELECT identity, pages FROM docs WHERE sha256 = ?", (sha256,))
        return (rows[0][0], rows[0][1]) if rows else None

    def get_vectors(self, keys: Sequence[str]) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), 500):
            batch = unique[i : i + 500]
            marks = ",".join("?" * len(batch))
            for key, blob in self._query(
                f"SELECT text_key, dense FROM vectors WHERE text_key IN ({marks})", batch
            ):
                out[key] = _unpack(blob)
        return out

    def put_vectors(self, items: Iterable[tuple[str, Sequence[float]]]) -> None:
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO vectors VALUES (?, ?, ?)",
                [(key, _pack(vec), now) for key, vec in items],
            )

    def prune_cache(self, older_than_s: float) -> int:
        """Drop cached vectors and identities no live or pending chunk uses, once unused a while
        (a file deleted now and put back later is re-indexed without embedding)."""
        cutoff = time.time() - older_than_s
        with self.transaction() as db:
            db.execute(
                "UPDATE vectors SET last_used = ? WHERE text_key IN (SELECT text_key FROM chunks)",
                (time.time(),),
            )
            db.execute(
                "UPDATE docs SET last_used = ? WHERE sha256 IN (SELECT sha256 FROM chunks)",
                (time.time(),),
            )
            n = db.execute("DELETE FROM vectors WHERE last_used < ?", (cutoff,)).rowcount
            db.execute("DELETE FROM docs WHERE last_used < ?", (cutoff,))
        return int(n)
