"""The folder watcher against real file operations, a real indexer and the parser sandbox.

Every test ends by comparing the index with the folder exactly (``index_problems``). The only
seam is a wrapper around ``Indexer.reconcile`` that records each call (and can hold one back or
fail one); nothing else is faked.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import ingest.watcher as watcher_module
from appliance.core.hashing import file_sha256
from appliance.core.settings import IngestSettings
from ingest.pipeline import Indexer, IngestReport
from ingest.watcher import FolderWatcher
from tests.ingest.exactness import index_problems

TIMEOUT_S = 20.0


class ReconcileCalls:
    """Wraps ``indexer.reconcile``: records each call's batch (None: full), can hold full
    reconciles at a gate, and can make the next call fail."""

    def __init__(self, indexer: Indexer) -> None:
        self._real = indexer.reconcile
        self.batches: list[list[str] | None] = []
        self.gate: threading.Event | None = None
        self.fail_next: Exception | None = None
        indexer.reconcile = self  # type: ignore[method-assign]

    def __call__(self, **kwargs: Any) -> IngestReport:
        only = kwargs.get("only")
        self.batches.append(None if only is None else sorted(only))
        if only is None and self.gate is not None:
            assert self.gate.wait(TIMEOUT_S), "the gate was never opened"
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        return self._real(**kwargs)

    @property
    def partial(self) -> list[list[str]]:
        return [b for b in self.batches if b is not None]

    @property
    def full(self) -> int:
        return sum(1 for b in self.batches if b is None)


def wait_for(predicate: Callable[[], object], what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def settle(watcher: FolderWatcher, indexer: Indexer, timeout: float = TIMEOUT_S) -> None:
    """Wait until the index equals the folder and the watcher has nothing left to do."""
    wait_for(lambda: not index_problems(indexer), "the index to equal the folder", timeout)
    assert watcher.wait_idle(timeout)
    assert index_problems(indexer) == []


def live_ids(indexer: Indexer, rel: str) -> set[str]:
    return {c.point_id for c in indexer.state.live_chunks_of_path(indexer.collection, rel)}


def text(n: int, words: int = 40) -> str:
    """A distinct document of a few chunks."""
    return " ".join(f"record{n} clause{i} retention{n * 7 + i}" for i in range(words)) + "\n"


class Rig:
    def __init__(self, docs: Path, indexer: Indexer, settings: IngestSettings) -> None:
        self.docs = docs
        self.indexer = indexer
        self.settings = settings
        self.calls = ReconcileCalls(indexer)
        self.reports: list[IngestReport] = []
        self.watcher = self.new_watcher()

    def new_watcher(self) -> FolderWatcher:
        self.watcher = FolderWatcher(self.indexer, self.settings, on_report=self.reports.append)
        return self.watcher

    @property
    def embedded(self) -> int:
        return int(self.indexer.embedder.embedded_texts)  # type: ignore[attr-defined]


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    return folder


@pytest.fixture
def make_rig(make_indexer: Callable[..., Indexer], docs: Path) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def build(**ingest: Any) -> Rig:
        settings = IngestSettings(
            **{"debounce_s": 0.3, "reconcile_interval_s": 0, "docs_dir": docs, **ingest}
        )
        rig = Rig(docs, make_indexer(docs, ingest=settings), settings)
        rigs.append(rig)
        return rig

    yield build
    for rig in rigs:
        rig.watcher.stop()


# --- everyday changes ------------------------------------------------------------------------


def test_create_modify_delete(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    with rig.watcher as watcher:
        assert watcher.health()["state"] == "ok"
        (rig.docs / "a.txt").write_text(text(1))
        (rig.docs / "sub").mkdir()
        (rig.docs / "sub" / "b.md").write_text("# Notes\n\n" + text(2))
        settle(watcher, rig.indexer)
        old = live_ids(rig.indexer, "a.txt")
        assert old

        (rig.docs / "a.txt").write_text(text(3))
        settle(watcher, rig.indexer)
        new = live_ids(rig.indexer, "a.txt")
        assert new
        assert new.isdisjoint(old)
        assert not old & rig.indexer.store.ids()

        (rig.docs / "sub" / "b.md").unlink()
        settle(watcher, rig.indexer)
        assert "sub/b.md" not in rig.indexer.state.files(rig.indexer.collection)
        health = watcher.health()
        assert health["state"] == "ok"
        assert health["pending"] == 0
        assert health["last_reconcile"] is not None
        assert health["last_error"] is None
    assert watcher.health()["state"] == "stopped"
    assert rig.reports, "on_report was never called"


def test_rename_moves_points_without_embedding(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    (rig.docs / "a.txt").write_text(text(1))
    with rig.watcher as watcher:
        old = live_ids(rig.indexer, "a.txt")
        embedded = rig.embedded
        (rig.docs / "a.txt").rename(rig.docs / "renamed.txt")
        settle(watcher, rig.indexer)
        new = live_ids(rig.indexer, "renamed.txt")
        assert len(new) == len(old)
        assert new.isdisjoint(old)
        assert rig.indexer.store.ids() == new
        assert rig.embedded == embedded
        assert ["a.txt", "renamed.txt"] in rig.calls.partial


@pytest.mark.parametrize("temp_name", [".x.txt.swp", "x.txt.tmp", ".goutputstream-ABC123"])
def test_atomic_save_by_rename(make_rig: Callable[..., Rig], temp_name: str) -> None:
    rig = make_rig()
    target = rig.docs / "x.txt"
    target.write_text(text(1))
    with rig.watcher as watcher:
        old = live_ids(rig.indexer, "x.txt")
        temp = rig.docs / temp_name
        temp.write_text(text(2))
        os.replace(temp, target)
        settle(watcher, rig.indexer)
        assert live_ids(rig.indexer, "x.txt").isdisjoint(old)
        assert all(batch == ["x.txt"] for batch in rig.calls.partial)


def test_office_style_save_ignores_owner_and_temp_files(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    doc = rig.docs / "report.txt"
    doc.write_text(text(1))
    with rig.watcher as watcher:
        # Word: an owner file while open; save writes a temp file, moves the original to a
        # backup name, moves the temp file onto the real name, deletes the backup.
        owner = rig.docs / "~$report.txt"
        owner.write_bytes(b"\x0bsomeone" + bytes(40))
        (rig.docs / ".~lock.report.txt#").write_text("lock")
        (rig.docs / "4913").write_text("")
        (rig.docs / "4913").unlink()
        temp = rig.docs / "~WRD0001.tmp"
        temp.write_text(text(2))
        doc.rename(rig.docs / "~WRL0002.tmp")
        temp.rename(doc)
        (rig.docs / "~WRL0002.tmp").unlink()
        settle(watcher, rig.indexer)
        owner.unlink()
        (rig.docs / ".~lock.report.txt#").unlink()
        assert watcher.wait_idle(TIMEOUT_S)
        assert index_problems(rig.indexer) == []
        assert set(rig.indexer.state.files(rig.indexer.collection)) == {"report.txt"}
        assert all(batch == ["report.txt"] for batch in rig.calls.partial)
        row = rig.indexer.state.file(rig.indexer.collection, "report.txt")
        assert row is not None
        assert row.indexed_sha256 == file_sha256(doc)


def test_growing_copy_is_indexed_once_complete(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(debounce_s=0.5)
    with rig.watcher as watcher:
        target = rig.docs / "big.txt"
        with target.open("w") as out:
            for part in range(8):  # about 1 s of writes, well inside the debounce each time
                out.write(text(100 + part))
                out.flush()
                time.sleep(0.12)
        settle(watcher, rig.indexer)
        assert [b for b in rig.calls.partial if "big.txt" in b] == [["big.txt"]]
        row = rig.indexer.state.file(rig.indexer.collection, "big.txt")
        assert row is not None
        assert row.indexed_sha256 == file_sha256(target)


def test_burst_of_files_is_one_batch(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    with rig.watcher as watcher:
        for n in range(500):
            (rig.docs / f"note-{n:03d}.txt").write_text(f"note {n} about topic {n % 17}\n")
        settle(watcher, rig.indexer, timeout=60)
        documents, _ = rig.indexer.state.counts(rig.indexer.collection)
        assert documents == 500
        assert rig.calls.full == 1  # the startup scan
        assert len(rig.calls.partial) <= 3, [len(b) for b in rig.calls.partial]
        assert sum(len(b) for b in rig.calls.partial) == 500


def test_folder_rename_keeps_vectors(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    (rig.docs / "team").mkdir()
    for n in range(3):
        (rig.docs / "team" / f"f{n}.txt").write_text(text(n))
    with rig.watcher as watcher:
        embedded = rig.embedded
        full = rig.calls.full
        (rig.docs / "team").rename(rig.docs / "group")
        settle(watcher, rig.indexer)
        assert rig.calls.full > full
        assert set(rig.indexer.state.files(rig.indexer.collection)) == {
            f"group/f{n}.txt" for n in range(3)
        }
        assert rig.embedded == embedded


# --- safety ----------------------------------------------------------------------------------


def test_mass_deletion_is_held_until_confirmed(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(mass_delete_min_files=20, mass_delete_fraction=0.5)
    for n in range(30):
        (rig.docs / f"d{n:02d}.txt").write_text(text(n, words=5))
    with rig.watcher as watcher:
        for n in range(24):
            (rig.docs / f"d{n:02d}.txt").unlink()
        wait_for(lambda: watcher.health()["state"] == "degraded", "the deletion to be held")
        assert watcher.wait_idle(TIMEOUT_S)
        reason = watcher.health()["reason"]
        assert "holding deletion of 24 documents" in reason
        assert "--confirm-deletions" in reason
        assert rig.indexer.state.counts(rig.indexer.collection)[0] == 30

        report = watcher.reconcile_now(confirm_deletions=True)
        assert report.removed == 24
        assert watcher.health()["state"] == "ok"
        assert index_problems(rig.indexer) == []


def test_startup_scan_applies_changes_made_while_stopped(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    for name in ("keep.txt", "edit.txt", "gone.txt", "move.txt"):
        (rig.docs / name).write_text(text(len(name)) + name)
    with rig.watcher:
        assert index_problems(rig.indexer) == []
    (rig.docs / "edit.txt").write_text(text(50))
    (rig.docs / "gone.txt").unlink()
    (rig.docs / "move.txt").rename(rig.docs / "moved.txt")
    (rig.docs / "new.md").write_text("# New\n\n" + text(51))
    with rig.new_watcher() as watcher:
        # start() returns after the startup scan: nothing to wait for.
        assert index_problems(rig.indexer) == []
        assert watcher.health()["state"] == "ok"


def test_change_without_event_is_found_by_periodic_scan(
    make_rig: Callable[..., Rig], tmp_path: Path
) -> None:
    """inotify reports a write to a directory's watch only when it is made through a name in
    that directory: a write through a hard link elsewhere (like a change on an NFS server)
    produces no event at all. Only the periodic full reconcile can find it."""
    rig = make_rig(reconcile_interval_s=1.0)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (rig.docs / "linked.txt").write_text(text(1))
    os.link(rig.docs / "linked.txt", outside / "alias.txt")
    with rig.watcher as watcher:
        full = rig.calls.full
        (outside / "alias.txt").write_text(text(2))
        settle(watcher, rig.indexer)
        assert rig.calls.full > full
        assert not any("linked.txt" in b for b in rig.calls.partial)


def test_queue_overflow_degrades_and_rescans(make_rig: Callable[..., Rig], tmp_path: Path) -> None:
    """A kernel queue overflow, driven through watchdog's own handling of IN_Q_OVERFLOW: the
    change made through a hard link produced no event, as if it had been dropped."""
    from watchdog.observers.inotify_c import (
        InotifyConstants,
        InotifyEvent,
        InotifyFD,
        WatchDescriptor,
    )

    rig = make_rig()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (rig.docs / "linked.txt").write_text(text(1))
    os.link(rig.docs / "linked.txt", outside / "alias.txt")
    with rig.watcher as watcher:
        inotify = getattr(watcher._observer, "_inotify_fd", None)
        assert isinstance(inotify, InotifyFD), "this test needs watchdog's inotify observer"
        (outside / "alias.txt").write_text(text(2))
        rig.calls.gate = threading.Event()
        inotify.handle_event(
            InotifyEvent(WatchDescriptor(-1), InotifyConstants.IN_Q_OVERFLOW, 0, b"")
        )
        health = watcher.health()
        assert health["state"] == "degraded"
        assert "overflowed" in health["reason"]
        wait_for(lambda: rig.calls.batches[-1] is None, "the full reconcile to start")
        rig.calls.gate.set()
        settle(watcher, rig.indexer)
        assert watcher.health()["state"] == "ok"
        # watchdog rebuilt its watches: later events still arrive.
        (rig.docs / "after.txt").write_text(text(3))
        settle(watcher, rig.indexer)
        assert ["after.txt"] in rig.calls.partial


def test_polling_fallback_when_inotify_cannot_start(
    make_rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_inotify() -> None:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(watcher_module, "Observer", no_inotify)
    rig = make_rig()
    with rig.watcher as watcher:
        health = watcher.health()
        assert health["state"] == "degraded"
        assert health["reason"] == "polling: inotify watch limit reached"
        (rig.docs / "polled.txt").write_text(text(1))
        settle(watcher, rig.indexer)
        assert ["polled.txt"] in rig.calls.partial


def test_documents_folder_vanishes_and_returns(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    (rig.docs / "a.txt").write_text(text(1))
    (rig.docs / "b.txt").write_text(text(2))
    with rig.watcher as watcher:
        shutil.rmtree(rig.docs)
        wait_for(lambda: watcher.health()["state"] == "degraded", "the missing folder")
        health = watcher.health()
        assert "does not exist" in health["reason"]
        assert health["last_error"] == health["reason"]
        assert rig.indexer.state.counts(rig.indexer.collection)[0] == 2  # nothing removed

        rig.docs.mkdir()
        (rig.docs / "c.txt").write_text(text(3))
        settle(watcher, rig.indexer)
        assert watcher.health()["state"] == "ok"
        # Watching was restarted on the new folder.
        (rig.docs / "d.txt").write_text(text(4))
        settle(watcher, rig.indexer)
        assert ["d.txt"] in rig.calls.partial


def test_start_without_documents_folder_waits_for_it(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    rig.docs.rmdir()
    with rig.watcher as watcher:
        health = watcher.health()
        assert health["state"] == "degraded"
        assert "does not exist" in health["reason"]
        rig.docs.mkdir()
        (rig.docs / "first.txt").write_text(text(1))
        settle(watcher, rig.indexer)
        assert watcher.health()["state"] == "ok"
        (rig.docs / "second.txt").write_text(text(2))
        settle(watcher, rig.indexer)
        assert ["second.txt"] in rig.calls.partial


def test_failed_batch_is_recorded_and_retried(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    with rig.watcher as watcher:
        rig.calls.fail_next = RuntimeError("disk on fire")
        (rig.docs / "a.txt").write_text(text(1))
        wait_for(lambda: watcher.health()["last_error"], "the failure to be recorded")
        assert "disk on fire" in watcher.health()["last_error"]
        settle(watcher, rig.indexer)  # the retry (a full reconcile) indexes it
        health = watcher.health()
        assert health["state"] == "ok"
        assert "disk on fire" in health["last_error"]


def test_stop_is_idempotent_and_restartable(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    watcher = rig.watcher
    assert watcher.health()["state"] == "stopped"
    watcher.stop()
    watcher.start()
    with pytest.raises(RuntimeError, match="already running"):
        watcher.start()
    watcher.stop()
    watcher.stop()
    assert not [t for t in threading.enumerate() if t.name == "ingest-watcher"]
    (rig.docs / "later.txt").write_text(text(1))
    with watcher:
        assert index_problems(rig.indexer) == []
        assert watcher.wait_idle(TIMEOUT_S)
