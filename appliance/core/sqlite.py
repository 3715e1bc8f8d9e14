"""The appliance's SQLite files (ingestion state, conversations, accounts) open and write alike:
WAL, foreign keys, a busy timeout for the other process that may write (the CLI beside the
service), and explicit write transactions taken before reading so check-then-change is atomic."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def connect(
    path: Path, schema: str, *, durable: bool = False, private: bool = False
) -> sqlite3.Connection:
    """Open (creating) a database and its schema. ``durable``: every commit survives a power
    loss, not only a killed process. ``private``: the file is created owner-only (SQLite gives
    its -wal and -shm files the main file's permissions)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA busy_timeout=5000")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
    db.execute("PRAGMA foreign_keys=ON")
    db.executescript(schema)
    return db


@contextmanager
def write(
    db: sqlite3.Connection, lock: threading.Lock | threading.RLock
) -> Iterator[sqlite3.Connection]:
    """One write transaction under the connection's lock."""
    with lock:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
