"""A full disk during ingestion pauses it (nothing lost, nothing marked failed, nothing
corrupted) and ingestion resumes by itself once space is freed, ending with index == folder."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ingest.disk_guard import DiskFullError
from ingest.watcher import FolderWatcher
from tests.conftest import small_settings
from tests.ingest.exactness import index_problems


def write_notes(docs: Path, start: int, count: int) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        body = "\n\n".join(f"Paragraph {j} of note {i} about retention." for j in range(6))
        (docs / f"note{i}.md").write_text(f"# Note {i}\n\n{body}\n")


def wait_for(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return bool(check())


def test_enospc_from_the_store_pauses_and_the_next_run_resumes(
    make_indexer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = tmp_path / "docs"
    write_notes(docs, 0, 3)
    indexer = make_indexer(docs)
    assert indexer.reconcile().added == 3
    write_notes(docs, 3, 3)
    real_upsert = indexer.store.upsert

    def full(points: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "index/wal/open-1")

    monkeypatch.setattr(indexer.store, "upsert", full)
    with pytest.raises(DiskFullError, match="disk full: No space left on device"):
        indexer.reconcile()
    status = indexer.status()
    assert status["paused"].startswith("disk full")
    assert status["failed"] == []  # nothing is blamed on the documents
    monkeypatch.setattr(indexer.store, "upsert", real_upsert)
    report = indexer.reconcile()
    assert (report.added, report.failed) == (3, 0)
    assert indexer.status()["paused"] is None
    assert index_problems(indexer) == []


def test_a_full_state_database_and_parser_do_not_mark_files_failed(
    make_indexer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    docs = tmp_path / "docs"
    write_notes(docs, 0, 2)
    indexer = make_indexer(docs)

    def sqlite_full(*_a: Any, **_k: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(indexer.state, "put_vectors", sqlite_full)
    with pytest.raises(DiskFullError):
        indexer.reconcile()
    monkeypatch.undo()
    real_parse = indexer.parser.parse

    def parser_full(path: Path) -> Any:
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(indexer.parser, "parse", parser_full)
    with pytest.raises(DiskFullError, match="quota"):
        indexer.reconcile()
    assert indexer.status()["failed"] == []
    monkeypatch.setattr(indexer.parser, "parse", real_parse)
    assert indexer.reconcile().added == 2
    assert index_problems(indexer) == []


def test_the_free_space_reserve_pauses_before_the_store_is_touched(
    make_indexer: Any, tmp_path: Path
) -> None:
    docs = tmp_path / "docs"
    write_notes(docs, 0, 2)
    indexer = make_indexer(docs)
    free = indexer.free_bytes()
    indexer.min_free_bytes = free * 2  # as if the disk were nearly full
    with pytest.raises(DiskFullError, match="MiB free"):
        indexer.reconcile()
    assert indexer.store.ids() == set()
    indexer.min_free_bytes = 0
    assert indexer.reconcile().added == 2


def test_the_watcher_resumes_by_itself(
    make_indexer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = tmp_path / "docs"
    write_notes(docs, 0, 3)
    indexer = make_indexer(docs)
    real_upsert = indexer.store.upsert
    monkeypatch.setattr(
        indexer.store, "upsert", lambda _p: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
    )
    ingest, _ = small_settings()
    with FolderWatcher(indexer, ingest) as watcher:
        health = watcher.health()
        assert health["state"] == "degraded"
        assert health["paused"].startswith("disk full")
        monkeypatch.setattr(indexer.store, "upsert", real_upsert)
        started = time.monotonic()
        assert wait_for(lambda: watcher.health()["paused"] is None, 40)
        print(f"resumed {time.monotonic() - started:.1f} s after space came back")
        assert watcher.wait_idle(30)
        assert watcher.health()["state"] == "ok"
    assert index_problems(indexer) == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs (Qdrant Edge needs about 8 MiB for an empty shard)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.integration
def test_a_really_full_disk_pauses_and_resumes_exactly(
    small_disk: Path, make_indexer: Any, tmp_path: Path
) -> None:
    # small_disk comes first: it is set up before, and unmounted after, the indexer's store
    docs = tmp_path / "docs"
    write_notes(docs, 0, 10)
    indexer = make_indexer(docs, data=small_disk / "data")
    indexer.min_free_bytes = 4 * 1024 * 1024
    assert indexer.reconcile().added == 10
    write_notes(docs, 10, 10)
    ballast = small_disk / "ballast"
    keep = 2 * 1024 * 1024  # below the reserve: the indexer must stop before the store fills
    with ballast.open("wb") as fh:
        fh.write(b"\0" * max(0, (indexer.free_bytes() or 0) - keep))
    ingest, _ = small_settings()
    with FolderWatcher(indexer, ingest) as watcher:
        assert watcher.health()["paused"].startswith("disk full")
        assert indexer.status()["failed"] == []
        ballast.unlink()
        started = time.monotonic()
        assert wait_for(lambda: watcher.health()["paused"] is None, 40)
        assert watcher.wait_idle(30)
        print(f"resumed {time.monotonic() - started:.1f} s after the ballast was deleted")
    assert index_problems(indexer) == []
    assert indexer.status()["documents"] == 20
