"""One owner per data folder.

Qdrant Edge (like any embedded store) must be opened by one process only. The owner takes an
exclusive ``flock`` on ``DATA/owner.lock`` and writes who it is into the file; the kernel drops
the lock when the process ends, even on kill -9, so a stale file never blocks a restart. A second
process gets ``StoreLockedError`` naming the owner.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from appliance.core.errors import StoreLockedError

LOCK_NAME = "owner.lock"


def read_owner(data_dir: Path) -> dict[str, Any] | None:
    try:
        text = (data_dir / LOCK_NAME).read_text(encoding="utf-8")
        owner = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"process {owner.get('pid')} ({owner.get('command', '?')}, started {started})"


class DataDirLock:
    """The exclusive ownership of a data folder; a context manager."""

    def __init__(self, data_dir: Path, role: str) -> None:
        self.data_dir = data_dir
        self.role = role
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(
                f"the data folder {self.data_dir} is in use by "
                f"{describe(read_owner(self.data_dir))}; "
                "stop it first, or run this command while it serves (search and status ask it)"
            ) from None
        os.ftruncate(fd, 0)
        info = {
            "pid": os.getpid(),
            "command": self.role,
            "argv": sys.argv[:4],
            "host": socket.gethostname(),
            "started": time.time(),
        }
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
