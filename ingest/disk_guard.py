"""The disk-full guard of ingestion: what counts as a full disk, and the free space kept.

A full disk pauses ingestion instead of failing files: ENOSPC or EDQUOT from the state, the store
or the parser is recognised by ``disk_full_reason`` and becomes ``DiskFullError`` (nothing is
marked failed, so nothing is lost). Qdrant Edge 0.9 writes through memory maps and dies with
SIGBUS instead of raising when the disk fills under it, so writers also call ``check_space``
first: it refuses a write while less than the reserve (plus the write in hand) is free.
"""

from __future__ import annotations

import errno
import shutil
import sqlite3
from pathlib import Path

from appliance.core.errors import IngestError

MIN_FREE_BYTES = 64 * 1024 * 1024
"""Free space kept in reserve on the data folder's disk: below it the indexer pauses, because
Qdrant Edge's memory-mapped write-ahead log kills the process (SIGBUS) on a full disk."""
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_SQLITE_FULL = 13  # SQLITE_FULL: "database or disk is full"
_DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "database or disk is full")


class DiskFullError(IngestError):
    """Ingestion paused: the data folder's disk (or quota) is full. Nothing was lost; the next
    reconcile carries on once there is space. ``exit_code`` is the CLI's distinct exit status."""

    exit_code = 5


def disk_full_reason(exc: BaseException) -> str | None:
    """Why ``exc`` (or an exception it was raised from) means a full disk, or None.

    SQLite reports SQLITE_FULL, OSError carries errno, and Qdrant Edge raises plain exceptions
    whose text holds the OS message, so all three are recognised."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DiskFullError):
            return str(current)
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return os_strerror(current)
        if isinstance(current, sqlite3.Error) and (
            getattr(current, "sqlite_errorcode", None) == _SQLITE_FULL
        ):
            return f"the ingestion state database: {current}"
        text = str(current).lower()
        if any(t in text for t in _DISK_FULL_TEXTS):
            return str(current)
        current = current.__cause__ or current.__context__
    return None


def os_strerror(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or errno.errorcode.get(exc.errno or 0, 'OSError')}{where}"


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the disk that holds ``folder``, None if unknown."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_space(folder: Path, needed: int) -> None:
    """Raise ``DiskFullError`` when less than ``needed`` bytes are free where ``folder`` is."""
    free = free_bytes(folder)
    if free is not None and free < needed:
        raise DiskFullError(
            f"disk full: {free / 1048576:.1f} MiB free in {folder}, "
            f"{needed / 1048576:.1f} MiB needed to write safely; "
            "ingestion is paused and resumes by itself once space is freed"
        )
