"""An append-only, tamper-evident audit log: one JSON record per line, each chained to the last.

A record is ``{"seq", "time", "user", "event", "data", "prev", "hash"}``: ``seq`` counts from 1,
``time`` is ISO 8601 UTC with milliseconds, ``prev`` is the previous record's ``hash`` (64 zeros
for the first), and ``hash`` is the SHA-256 of the record without ``hash`` as canonical JSON
(sorted keys, separators ``(",", ":")``, ``ensure_ascii=False``). Lines are written in that
canonical form too.

:func:`verify` detects an edited record (its hash no longer matches), a deleted, inserted or
reordered line (``prev`` or ``seq`` out of step) and a truncated or garbled line. What a hash
chain cannot show on its own is a rewrite of the whole chain from some point on, or the removal
of the newest records: for that, export the latest hash (``VerifyResult.last_hash``, the
*anchor*) to somewhere the appliance cannot write (a ticket, a signed e-mail, a notary) and pass
it back to :func:`verify` as ``anchor`` later.

:class:`AuditLog` appends under ``fcntl.flock`` and re-reads the last record's hash under the
lock (seeking from the end), so threads and processes may share one file; each append is
``fsync``-ed unless ``fsync=False``. The file is never rotated. If its last line is incomplete
or does not verify (a crash mid-write, an edit), appending stops with :class:`AuditError`
rather than chain onto it: an admin inspects the file (``verify``), moves it aside or cuts the
broken tail, and records why.

Events the appliance logs are the ``EVENT_*`` constants; ``data`` holds:

- ``login``: client; ``login_failed``: client, reason; ``logout``: nothing.
- ``question``: question, conversation, model, answer_abstained,
  retrieved ``[{path, chunk_id, doc_hash, score}]``.
- ``feedback``: conversation, message, rating, comment.
- ``admin``: action, target (and the change).
- ``model_change``: previous, current; ``document_upload``: path, doc_hash, collection;
  ``deletion_confirmed``: paths or count.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from appliance.errors import ApplianceError

EVENT_LOGIN = "login"
EVENT_LOGIN_FAILED = "login_failed"
EVENT_LOGOUT = "logout"
EVENT_QUESTION = "question"
EVENT_FEEDBACK = "feedback"
EVENT_ADMIN = "admin"
EVENT_MODEL_CHANGE = "model_change"
EVENT_DOCUMENT_UPLOAD = "document_upload"
EVENT_DELETION_CONFIRMED = "deletion_confirmed"
EVENTS: frozenset[str] = frozenset(
    {
        EVENT_LOGIN,
        EVENT_LOGIN_FAILED,
        EVENT_LOGOUT,
        EVENT_QUESTION,
        EVENT_FEEDBACK,
        EVENT_ADMIN,
        EVENT_MODEL_CHANGE,
        EVENT_DOCUMENT_UPLOAD,
        EVENT_DELETION_CONFIRMED,
    }
)

GENESIS = "0" * 64
_EVENT_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_HASH = re.compile(r"[0-9a-f]{64}")
_FIELDS = frozenset({"seq", "time", "user", "event", "data", "prev", "hash"})
_TAIL_BLOCK = 8192


class AuditError(ApplianceError):
    """The audit log cannot be appended to or read, or a record cannot be written as JSON."""


def _default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def canonical(record: dict[str, Any]) -> str:
    """The canonical JSON text of ``record`` that its hash is taken over."""
    return json.dumps(
        record,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
        default=_default,
    )


def record_hash(record: dict[str, Any]) -> str:
    """The SHA-256 of ``record`` without its ``hash`` field, as canonical JSON."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body).encode("utf-8")).hexdigest()


def _timestamp(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _parse(line: bytes) -> dict[str, Any] | None:
    """The record on ``line`` when it is well-formed JSON with the expected fields."""
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        return None
    if (
        not isinstance(record, dict)
        or set(record) != _FIELDS
        or not isinstance(record["seq"], int)
        or isinstance(record["seq"], bool)
        or not isinstance(record["hash"], str)
        or not isinstance(record["prev"], str)
        or not isinstance(record["time"], str)
        or not isinstance(record["event"], str)
        or not isinstance(record["data"], dict)
    ):
        return None
    return record


def _last_line(fd: int, size: int) -> tuple[bytes, int]:
    """The last line of the file (with its newline, if any) and its offset, read backwards."""
    buf = b""
    pos = size
    while pos > 0:
        step = min(_TAIL_BLOCK, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        cut = buf.rfind(b"\n", 0, len(buf) - 1)
        if cut >= 0:
            return buf[cut + 1 :], pos + cut + 1
    return buf, 0


class AuditLog:
    """Appends chained records to ``path`` (``DATA/audit/audit.jsonl``).

    The folder is created owner-only (0700) and the file 0600. ``clock`` returns Unix time.
    """

    def __init__(
        self, path: Path, *, fsync: bool = True, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = path
        self._fsync = fsync
        self._clock = clock
        self._lock = threading.Lock()
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.parent.chmod(0o700)
        created = not path.exists()
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open the audit log {path}: {exc.strerror}") from exc
        if created and fsync:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _tail(self) -> tuple[int, str]:
        """The last record's seq and hash (0 and 64 zeros for an empty log); called locked."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return 0, GENESIS
        line, _ = _last_line(self._fd, size)
        record = _parse(line) if line.endswith(b"\n") else None
        if record is None or record["hash"] != record_hash(record):
            raise AuditError(
                f"the last line of the audit log {self.path} is incomplete or does not verify; "
                "nothing more is appended until an admin checks it (appliance audit verify) and "
                "moves the file aside or removes the broken line"
            )
        return int(record["seq"]), str(record["hash"])

    def record(self, event: str, user: str | None, **data: Any) -> dict[str, Any]:
        """Append one record and return it (with its ``seq`` and ``hash``)."""
        if not isinstance(event, str) or not _EVENT_NAME.fullmatch(event):
            raise AuditError(f"invalid audit event {event!r}: use lower-case letters, digits, _")
        if user is not None and not isinstance(user, str):
            raise AuditError(f"invalid audit user {user!r}: a name or None")
        with self._lock:
            if self._fd < 0:
                raise AuditError(f"the audit log {self.path} is closed")
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                seq, prev = self._tail()
                record: dict[str, Any] = {
                    "seq": seq + 1,
                    "time": _timestamp(self._clock()),
                    "user": user,
                    "event": event,
                    "data": data,
                    "prev": prev,
                }
                try:
                    record["hash"] = record_hash(record)
                    line = (canonical(record) + "\n").encode("utf-8")
                except (TypeError, ValueError) as exc:
                    raise AuditError(
                        f"audit event {event!r} has data JSON cannot hold: {exc}"
                    ) from exc
                # Re-read through JSON so the caller sees what verify() will see.
                record = json.loads(line)
                view = memoryview(line)
                while view:
                    view = view[os.write(self._fd, view) :]
                if self._fsync:
                    os.fsync(self._fd)
            except OSError as exc:
                raise AuditError(f"cannot append to the audit log {self.path}: {exc}") from exc
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        return record


@dataclass(frozen=True)
class VerifyResult:
    """``problem`` names the first bad line (1-based) and what is wrong with it; ``last_hash``
    is the anchor to export for notarisation (64 zeros for an empty log)."""

    ok: bool
    records: int
    problem: str | None = None
    last_hash: str = GENESIS


def _line_problem(line: bytes, expected_seq: int, prev: str) -> tuple[str | None, str]:
    """What is wrong with ``line`` as the record after ``prev``, and its hash."""
    if not line.endswith(b"\n"):
        return "truncated last line (no line end): a write was cut short", prev
    record = _parse(line)
    if record is None:
        return "garbled line: not a well-formed audit record", prev
    seq = record["seq"]
    if record["hash"] != record_hash(record):
        return f"record seq {seq} was edited (its hash does not match)", prev
    if line != (canonical(record) + "\n").encode("utf-8"):
        return f"record seq {seq} was edited (the line is not in canonical form)", prev
    if seq != expected_seq:
        return (
            f"seq {seq} where {expected_seq} was expected: a line was deleted, inserted or moved",
            prev,
        )
    if record["prev"] != prev:
        return (
            f"record seq {seq} does not follow the line before it (prev hash mismatch): a line "
            "was deleted, inserted or moved",
            prev,
        )
    return None, str(record["hash"])


def verify(path: Path, *, anchor: str | None = None) -> VerifyResult:
    """Check the whole chain of ``path``; with ``anchor`` (a hash exported earlier), also check
    that the chain still holds the record it belongs to."""
    if anchor is not None and not _HASH.fullmatch(anchor):
        return VerifyResult(False, 0, f"the anchor {anchor!r} is not a SHA-256 hex digest")
    try:
        handle = path.open("rb")
    except OSError as exc:
        return VerifyResult(False, 0, f"cannot read the audit log {path}: {exc.strerror}")
    prev, count, anchored = GENESIS, 0, anchor is None
    with handle:
        for number, line in enumerate(handle, start=1):
            problem, prev = _line_problem(line, count + 1, prev)
            if problem is not None:
                return VerifyResult(False, count, f"line {number}: {problem}", prev)
            count += 1
            anchored = anchored or prev == anchor
    if not anchored:
        return VerifyResult(
            False,
            count,
            f"the anchor {anchor} is not in the chain: records up to it were removed or the "
            "log was rewritten",
            prev,
        )
    return VerifyResult(True, count, None, prev)


def _aware(moment: datetime) -> datetime:
    """A naive datetime is taken as UTC, the log's own zone."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def read(
    path: Path,
    *,
    since: datetime | None = None,
    user: str | None = None,
    event: str | None = None,
) -> Iterator[dict[str, Any]]:
    """The records of ``path`` in order, filtered by time (at or after ``since``; naive means
    UTC), ``user`` and ``event``. Lines that are not well-formed records are skipped: this
    reads, it does not check; :func:`verify` checks."""
    start = _aware(since) if since is not None else None
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise AuditError(f"cannot read the audit log {path}: {exc.strerror}") from exc
    with handle:
        for line in handle:
            record = _parse(line)
            if record is None:
                continue
            if user is not None and record["user"] != user:
                continue
            if event is not None and record["event"] != event:
                continue
            if start is not None:
                try:
                    moment = _aware(datetime.fromisoformat(record["time"]))
                except ValueError:
                    continue
                if moment < start:
                    continue
            yield record
