"""Keep the index equal to the documents folder while the service runs.

The watchdog handler only records which relative paths changed; one worker thread turns them
into work. A path is ready once no event came for it (and, normally, for the whole folder) for
``debounce_s`` and its ``(size, mtime_ns)`` did not change between two checks, so a copy that
is still growing waits and a burst of thousands of files becomes one ``Indexer.reconcile(only=
...)`` call. Renames, the vector cache and the mass-deletion guard are the indexer's business.

Events can be lost, so a full ``reconcile()`` runs:
  * at ``start()`` (whatever changed while the service was down);
  * when a folder is created, moved or deleted (cheaper than tracking its contents);
  * when inotify reports a queue overflow (seen through watchdog's warning, see
    ``_OverflowAlarm``) or its watches cannot be rebuilt;
  * after a failed reconcile, with backoff (a documents share that went away), and at once when
    the folder is back or, after a full disk paused the indexer, when space is free again;
  * every ``reconcile_interval_s`` (0: never), for whatever no signal revealed.

``health()`` reports 'degraded' with a reason while events may be missed (polling fallback,
folders without an inotify watch, an overflow not yet rescanned), while the indexer holds a
mass deletion, and while reconciles fail.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from appliance.core.errors import IngestError
from appliance.core.settings import IngestSettings
from ingest.disk_guard import DiskFullError
from ingest.pipeline import Indexer, IngestReport
from ingest.scan import is_candidate, relative

log = logging.getLogger(__name__)

TICK_S = 0.2
"""How often the worker looks at pending paths while there are any."""
MAX_DEFER_S = 10.0
"""A path waits for the whole folder to be quiet at most this long (or 10 debounce periods)."""
RETRY_MIN_S = 1.0
RETRY_MAX_S = 30.0
"""Backoff between attempts after a failed reconcile."""
POLL_INTERVAL_S = 2.0
"""Scan period of the polling fallback."""
WATCHDOG_LOGGER = "watchdog.observers"

_FILE_EVENTS = (
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileAttribEvent,
    FileDeletedEvent,
    FileMovedEvent,
)
_DIR_EVENTS = (DirCreatedEvent, DirDeletedEvent, DirMovedEvent)

Signature = tuple[int, int] | None
"""(size, mtime_ns) of a file, or None when it does not exist."""


def _signature(path: Path) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


@dataclass
class _Pending:
    first: float
    last: float
    sig: Signature = None
    checked: bool = False


class _EventHandler(FileSystemEventHandler):
    """Runs in the observer's thread: maps events to relative paths and nothing else."""

    def __init__(self, watcher: FolderWatcher, root: Path, suffixes: frozenset[str]) -> None:
        self._watcher = watcher
        self._root = root
        self._suffixes = suffixes

    def _rel(self, raw: bytes | str) -> str | None:
        return relative(self._root, Path(os.fsdecode(raw))) if raw else None

    def _is_root(self, raw: bytes | str) -> bool:
        return Path(os.fsdecode(raw)) == self._root

    def dispatch(self, event: FileSystemEvent) -> None:
        dest_raw = event.dest_path
        if isinstance(event, _DIR_EVENTS):
            if isinstance(event, DirDeletedEvent) and self._is_root(event.src_path):
                self._watcher._watch_lost("the documents folder was deleted")
                return
            src, dest = self._rel(event.src_path), self._rel(dest_raw)
            if src is not None or dest is not None:
                what = type(event).__name__.removeprefix("Dir").removesuffix("Event").lower()
                self._watcher._request_full(f"folder {what}: {src or dest}")
            return
        if not isinstance(event, _FILE_EVENTS):
            return  # opened, closed without writing, a folder's own mtime
        paths = [
            rel
            for rel in (self._rel(event.src_path), self._rel(dest_raw))
            if rel is not None and is_candidate(rel, self._suffixes)
        ]
        if paths:
            self._watcher._record(paths)


class _OverflowAlarm(logging.Handler):
    """Hears watchdog's own warnings about lost inotify events.

    watchdog 7 handles ``IN_Q_OVERFLOW`` inside its inotify thread (it rebuilds the recursive
    watches) and tells no event handler; its only outward sign is a WARNING on the
    ``watchdog.observers.inotify_c`` logger ("Inotify queue overflowed; filesystem events
    were lost"), and an ERROR when the watches cannot be rebuilt. This handler turns those
    records into a full reconcile. The loggers are process-wide, so every watcher in the
    process rescans: harmless, and the safe side.
    """

    def __init__(self, on_lost: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self._on_lost = on_lost

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage().lower()
        except Exception:  # a malformed record is not ours to report
            return
        if "unable to rebuild" in message:
            self._on_lost("inotify watches could not be rebuilt after a queue overflow")
        elif "overflow" in message:
            self._on_lost("inotify event queue overflowed: file events were lost")


def _inotify_watches_in_process() -> int | None:
    """How many inotify watches this process holds (proc(5), fdinfo), or None off Linux."""
    fdinfo = Path("/proc/self/fdinfo")
    try:
        fds = os.listdir(fdinfo)
    except OSError:
        return None
    total = 0
    for fd in fds:
        try:
            text = (fdinfo / fd).read_text(errors="replace")
        except OSError:
            continue
        total += text.count("inotify wd:")
    return total


def _watchable_folders(root: Path) -> int:
    """The folders a recursive inotify watch of ``root`` needs (symlinks are not followed)."""
    count = 1
    for dirpath, dirnames, _ in os.walk(root, followlinks=False):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path) and os.access(path, os.R_OK | os.X_OK):
                count += 1
    return count


def _watch_limit() -> str:
    try:
        return Path("/proc/sys/fs/inotify/max_user_watches").read_text().strip()
    except OSError:
        return "?"


class FolderWatcher:
    """Watches ``indexer.docs_dir`` and keeps the indexer's collection equal to it.

    A context manager: ``start()`` runs the startup scan and starts the observer and the
    worker thread; ``stop()`` stops and joins them (idempotent). ``on_report`` is called, in
    the thread that ran it, with the report of every reconcile that succeeded.
    """

    def __init__(
        self,
        indexer: Indexer,
        settings: IngestSettings,
        *,
        on_report: Callable[[IngestReport], None] | None = None,
    ) -> None:
        self._indexer = indexer
        self._settings = settings
        self._on_report = on_report
        self._debounce = settings.debounce_s
        self._max_defer = max(MAX_DEFER_S, 10 * settings.debounce_s)
        # Everything below is guarded by _cond (except _observer, owned by start/stop/worker).
        self._cond = threading.Condition()
        self._pending: dict[str, _Pending] = {}
        self._last_event = 0.0
        self._full_since: float | None = None
        self._full_why = ""
        self._retry_at = 0.0
        self._failures = 0
        self._busy = 0
        self._running = False
        self._stopping = False
        self._next_timer: float | None = None
        self._observer_broken = False
        self._watch_problem: str | None = None
        self._lost: str | None = None
        self._lost_seq = 0
        self._failure: str | None = None
        self._folder_failed = False
        self._disk_full = False
        self._held = 0
        self._last_reconcile: float | None = None
        self._last_error: str | None = None
        # One reconcile at a time, whoever asks (the worker, reconcile_now, start).
        self._reconcile_lock = threading.Lock()
        self._observer: BaseObserver | None = None
        self._worker: threading.Thread | None = None
        self._alarm: _OverflowAlarm | None = None

    # --- lifetime ----------------------------------------------------------------------------

    def __enter__(self) -> FolderWatcher:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Watch, scan the whole folder once, then process events until ``stop()``.

        The observer starts before the startup scan, so a change made during the scan is
        recorded rather than missed. A failing scan (the folder is absent) does not raise: it
        is reported by ``health()`` and retried.
        """
        with self._cond:
            if self._running:
                raise RuntimeError("the folder watcher is already running")
            self._running = True
            self._stopping = False
            self._full_since = None  # the startup scan covers what was asked before
        try:
            self._alarm = _OverflowAlarm(self._events_lost)
            watchdog_log = logging.getLogger(WATCHDOG_LOGGER)
            watchdog_log.addHandler(self._alarm)
            if watchdog_log.getEffectiveLevel() > logging.WARNING:
                log.warning(
                    "the %r logger is set above WARNING: inotify queue overflows will only be "
                    "caught by the periodic scan",
                    WATCHDOG_LOGGER,
                )
            self._start_observer()
            self._reconcile(None)
            self._worker = threading.Thread(target=self._work, name="ingest-watcher", daemon=True)
            self._worker.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the worker (after the batch it is running) and the observer."""
        with self._cond:
            if not self._running:
                return
            self._stopping = True
            self._cond.notify_all()
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.join()
        self._stop_observer()
        if self._alarm is not None:
            logging.getLogger(WATCHDOG_LOGGER).removeHandler(self._alarm)
            self._alarm = None
        with self._cond:
            self._running = False
            self._cond.notify_all()

    # --- public ------------------------------------------------------------------------------

    def reconcile_now(self, confirm_deletions: bool = False) -> IngestReport:
        """A full reconcile in the caller's thread, serialised with the worker's batches.
        ``confirm_deletions`` applies a mass deletion the indexer is holding. Raises what the
        indexer raises (IngestError when the folder is gone); health() records it too."""
        with self._cond:
            self._full_since = None  # this call covers any full reconcile requested so far
            self._busy += 1
        try:
            report = self._reconcile(None, confirm=confirm_deletions, raise_errors=True)
            assert report is not None
            return report
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no event is pending, no full reconcile is due and no batch runs.
        Returns False if that did not happen within ``timeout`` seconds. An event the
        kernel has not delivered yet is not pending: wait for its effect, not on this."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._full_since is not None or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def health(self) -> dict[str, Any]:
        with self._cond:
            reasons = [r for r in (self._watch_problem, self._lost, self._failure) if r]
            if self._held:
                reasons.append(
                    f"holding deletion of {self._held} documents: confirm with "
                    "`appliance ingest --confirm-deletions`"
                )
            state = "stopped" if not self._running else "degraded" if reasons else "ok"
            return {
                "state": state,
                "reason": "; ".join(reasons) if reasons and self._running else None,
                "pending": len(self._pending),
                "last_reconcile": self._last_reconcile,
                "last_error": self._last_error,
                "paused": self._indexer.paused,
            }

    # --- events (observer thread) ------------------------------------------------------------

    def _record(self, paths: list[str]) -> None:
        now = time.monotonic()
        with self._cond:
            wake = not self._pending
            for rel in paths:
                entry = self._pending.get(rel)
                if entry is None:
                    self._pending[rel] = _Pending(first=now, last=now)
                else:
                    entry.last = now
            self._last_event = now
            if wake:
                self._cond.notify_all()

    def _request_full(self, why: str) -> None:
        now = time.monotonic()
        with self._cond:
            if self._full_since is None:
                self._full_since = now
                self._full_why = why
            self._last_event = now  # the full reconcile, too, waits for a quiet folder
            self._cond.notify_all()

    def _events_lost(self, reason: str) -> None:
        with self._cond:
            if self._lost != reason:
                log.warning("%s; a full reconcile follows", reason)
            self._lost = reason
            self._lost_seq += 1
        self._request_full(reason)

    def _watch_lost(self, why: str) -> None:
        with self._cond:
            self._observer_broken = True
        self._request_full(why)

    # --- the observer ------------------------------------------------------------------------

    def _start_observer(self) -> None:
        """Start watching, falling back to polling when inotify cannot watch the folder."""
        docs = self._indexer.docs_dir
        if not docs.is_dir():
            with self._cond:
                self._observer_broken = True
            return
        root = docs.resolve()
        handler = _EventHandler(self, root, self._indexer.suffixes)
        problem: str | None = None
        folders = _watchable_folders(root)
        observer: BaseObserver | None = None
        try:
            observer = Observer()
            observer.schedule(handler, str(root), recursive=True)
            observer.start()
        except Exception as exc:  # OSError (ENOSPC, EMFILE), UnsupportedLibcError
            if observer is not None:
                with contextlib.suppress(Exception):
                    observer.stop()
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            problem = f"polling: {why}"
            log.warning("cannot watch %s with inotify (%s); polling it instead", root, why)
            observer = PollingObserver(timeout=POLL_INTERVAL_S)
            observer.schedule(handler, str(root), recursive=True)
            try:
                observer.start()
            except OSError as poll_exc:  # the folder vanished meanwhile
                log.warning("cannot watch %s: %s", root, poll_exc)
                with self._cond:
                    self._observer_broken = True
                return
        else:
            if isinstance(observer, PollingObserver):
                problem = "polling: no native file events on this platform"
            else:
                watches = _inotify_watches_in_process()
                if watches is not None and watches < folders:
                    problem = (
                        f"inotify watches only {watches} of {folders} folders "
                        f"(fs.inotify.max_user_watches={_watch_limit()}): changes in the others "
                        "are found by the periodic full scan only"
                    )
                    log.warning("%s", problem)
        self._observer = observer
        with self._cond:
            self._observer_broken = False
            self._watch_problem = problem

    def _stop_observer(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            with contextlib.suppress(RuntimeError):  # never started
                observer.join()

    def _check_observer(self) -> None:
        """Restart watching once the folder is back after it vanished."""
        observer = self._observer
        with self._cond:
            broken = self._observer_broken
        if not broken and observer is not None:
            emitters = observer.emitters
            if observer.is_alive() and emitters and all(e.is_alive() for e in emitters):
                return
            log.warning("watching %s stopped; restarting it", self._indexer.docs_dir)
            broken = True
        if not broken or not self._indexer.docs_dir.is_dir():
            with self._cond:
                self._observer_broken = broken
            return
        self._stop_observer()
        self._start_observer()
        self._request_full("watching restarted")
        with self._cond:
            self._retry_at = 0.0

    # --- the worker --------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                self._cond.wait(self._wait_s())
                if self._stopping:
                    return
            try:
                self._tick()
            except Exception as exc:  # never let the thread die
                log.exception("file watcher step failed")
                with self._cond:
                    self._last_error = f"{type(exc).__name__}: {exc}"

    def _wait_s(self) -> float | None:
        if self._pending or self._full_since is not None or self._observer_broken:
            return TICK_S
        if self._next_timer is not None:
            return max(0.0, self._next_timer - time.monotonic())
        return None

    def _tick(self) -> None:
        self._check_observer()
        # Outside the lock: a stat on a hung network share must not block health().
        folder_back = self._folder_failed and self._indexer.docs_dir.is_dir()
        space_back = self._disk_full and self._indexer.has_space()
        now = time.monotonic()
        with self._cond:
            if self._next_timer is not None and now >= self._next_timer:
                self._next_timer = None  # set again when a full reconcile completes
                if self._full_since is None:
                    self._full_since, self._full_why = now, "periodic scan"
            if self._folder_failed and self._retry_at > now and folder_back:
                self._retry_at = now  # the folder is back: do not wait for the backoff
            if self._disk_full and self._retry_at > now and space_back:
                self._retry_at = now  # space was freed: resume without waiting
            quiet = now - self._last_event >= self._debounce
            candidates = [
                (rel, entry.last)
                for rel, entry in self._pending.items()
                if now - entry.last >= self._debounce
                and (quiet or now - entry.first >= self._max_defer)
            ]
            full_due = (
                self._full_since is not None
                and now >= self._retry_at
                and (quiet or now - self._full_since >= self._max_defer)
            )
        docs = self._indexer.docs_dir
        sigs = {rel: _signature(docs / rel) for rel, _ in candidates}
        ready: list[str] = []
        with self._cond:
            for rel, last in candidates:
                entry = self._pending.get(rel)
                if entry is None or entry.last != last:
                    continue  # a new event came meanwhile
                if entry.checked and entry.sig == sigs[rel]:
                    ready.append(rel)
                    del self._pending[rel]
                else:
                    entry.sig, entry.checked = sigs[rel], True
            if full_due:
                why, self._full_since = self._full_why, None
                for rel, last in candidates:  # the full reconcile covers the quiet paths
                    entry = self._pending.get(rel)
                    if entry is not None and entry.last == last:
                        del self._pending[rel]
            if not ready and not full_due:
                return
            self._busy += 1
        try:
            if full_due:
                log.info("full reconcile of %s: %s", docs, why)
                self._reconcile(None)
            else:
                self._reconcile(sorted(ready))
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    # --- reconciling -------------------------------------------------------------------------

    def _reconcile(
        self, only: list[str] | None, *, confirm: bool = False, raise_errors: bool = False
    ) -> IngestReport | None:
        with self._reconcile_lock:
            with self._cond:
                lost_seq = self._lost_seq
            try:
                report = self._indexer.reconcile(confirm_deletions=confirm, only=only)
            except Exception as exc:
                self._failed(exc)
                if raise_errors:
                    raise
                return None
            self._succeeded(report, full=only is None, lost_seq=lost_seq)
        if only is not None:
            log.debug("reconciled %d changed paths: %s", len(only), report.as_json())
        if self._on_report is not None:
            try:
                self._on_report(report)
            except Exception:
                log.exception("the watcher's report callback failed")
        return report

    def _succeeded(self, report: IngestReport, *, full: bool, lost_seq: int) -> None:
        now = time.monotonic()
        with self._cond:
            if self._failure is not None:
                log.info("reconcile of %s succeeded again", self._indexer.docs_dir)
            self._failure = None
            self._folder_failed = False
            self._disk_full = False
            self._failures = 0
            self._retry_at = 0.0
            self._last_reconcile = time.time()
            if report.held_deletions:
                self._held = report.held_deletions
            elif full:
                # A partial batch holding nothing says nothing about the held paths.
                self._held = 0
            if full:
                if self._lost_seq == lost_seq:
                    self._lost = None
                interval = self._settings.reconcile_interval_s
                self._next_timer = now + interval if interval > 0 else None

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, IngestError):
            message = str(exc)
        else:
            message = f"reconcile failed: {type(exc).__name__}: {exc}"
        folder_gone = not self._indexer.docs_dir.is_dir()
        now = time.monotonic()
        with self._cond:
            # The indexer logs a full disk itself, once per episode, whatever the retries say.
            logged = isinstance(exc, DiskFullError)
            if message != self._last_error and not logged:
                if isinstance(exc, IngestError):
                    log.error("%s", message)
                else:
                    log.error("%s", message, exc_info=exc)
            self._failure = message
            self._last_error = message
            self._folder_failed = folder_gone
            self._disk_full = isinstance(exc, DiskFullError)
            if folder_gone:
                self._observer_broken = True  # watch the folder anew once it is back
            self._failures += 1
            self._retry_at = now + min(RETRY_MAX_S, RETRY_MIN_S * 2 ** (self._failures - 1))
            if self._full_since is None:
                self._full_since, self._full_why = now, f"retry after: {message}"
            self._cond.notify_all()
