"""An append-only, tamper-evident audit log: one JSON record per line, each chained to the last.

A record is ``{"seq", "time", "user", "event", "data", "prev", "hash"}`` (plus ``"mac"`` when a
key is configured, below): ``seq`` counts from 1,
``time`` is ISO 8601 UTC with milliseconds, ``prev`` is the previous record's ``hash`` (64 zeros
for the first), and ``hash`` is the SHA-256 of the record without ``hash`` as canonical JSON
(sorted keys, separators ``(",", ":")``, ``ensure_ascii=False``). Lines are written in that
canonical form too.

:func:`verify` detects an edited record (its hash no longer matches), a deleted, inserted or
reordered line (``prev`` or ``seq`` out of step) and a truncated or garbled line. What a hash
chain cannot show on its own is a rewrite of the whole chain from some point on, or the removal
of the newest records: for that, export the latest hash (``VerifyResult.last_hash``, the
*anchor*) to somewhere the appliance cannot write (a ticket, a signed e-mail, a notary) and pass
it back to :func:`verify` as ``anchor`` later. An :class:`Anchor` is ``(count, last_hash)``:
``appliance audit anchor`` prints it, the core service writes one to the system journal every
``audit.anchor_every`` records and at shutdown, and ``appliance audit verify --anchor`` takes a
hash, an anchor file or that journal line, and fails when the record it names is gone or changed.

**Keyed chain.** With ``audit.hmac_key_file`` (a file outside the data folder, root-owned and
readable by the service: ``install.sh --system`` creates it), every record also carries
``mac`` = HMAC-SHA256(key, ``hash``). Someone who can write the data folder but not read the key
can then no longer rewrite the chain from some point on and re-hash it: :func:`verify` with the
key rejects a record whose ``mac`` is missing or wrong after the first keyed one, and reports
how many records at the start predate the key (``keyed_from``).

**Names.** ``user`` holds only a valid account name or a ``local:`` operator identity (which no
account name can take); a raw, possibly hostile attempt (a failed sign-in's username) goes in
``data``. Printing records is :func:`printable`'s job: it escapes control and format characters
so a stored string cannot forge or hide lines on a terminal.

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
import hmac
import json
import logging
import os
import re
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from appliance.core.errors import ApplianceError

if TYPE_CHECKING:
    from appliance.core.settings import Settings

log = logging.getLogger(__name__)

EVENT_LOGIN = "login"
EVENT_LOGIN_FAILED = "login_failed"
EVENT_LOGOUT = "logout"
EVENT_QUESTION = "question"
EVENT_ANSWER_END = "answer_end"
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
        EVENT_ANSWER_END,
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
_KEYED_FIELDS = _FIELDS | {"mac"}
_TAIL_BLOCK = 8192
# An account name (appliance.accounts) or a local operator ("local:" + the OS user or a tool).
_USER = re.compile(r"[A-Za-z0-9._@-]{1,64}|local:[A-Za-z0-9._@:-]{1,64}")
_ANCHOR_LINE = re.compile(r"count=(\d+)\s+last_hash=([0-9a-f]{64})")
MIN_KEY_BYTES = 32


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
    """The SHA-256 of ``record`` without its ``hash`` and ``mac`` fields, as canonical JSON."""
    body = {k: v for k, v in record.items() if k not in ("hash", "mac")}
    return hashlib.sha256(canonical(body).encode("utf-8")).hexdigest()


def record_mac(key: bytes, digest: str) -> str:
    """The keyed MAC of a record's ``hash``."""
    return hmac.new(key, digest.encode("ascii"), hashlib.sha256).hexdigest()


def valid_user(user: str) -> bool:
    """Whether ``user`` may stand in a record's ``user`` field."""
    return bool(_USER.fullmatch(user))


def local_identity() -> str:
    """Who acts from the host's command line: ``local:`` and the OS user (``SUDO_USER`` first),
    a name no account can take (account names have no colon)."""
    import getpass

    name = os.environ.get("SUDO_USER") or ""
    if not name:
        try:
            name = getpass.getuser()
        except (KeyError, OSError):
            name = "operator"
    name = re.sub(r"[^A-Za-z0-9._@-]", "_", name)[:64] or "operator"
    return f"local:{name}"


def printable(text: str) -> str:
    """``text`` with control and format characters (newlines, ANSI escapes, bidi overrides)
    shown as ``\\uXXXX``, so a stored string prints as one inert line."""
    return "".join(
        f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c
        for c in text
    )


def load_key(path: Path, data_dir: Path | None = None) -> bytes:
    """The HMAC key in ``path``; it must lie outside the data folder (whoever can write that
    folder must not be able to read the key) and hold at least 32 bytes."""
    if data_dir is not None and path.resolve().is_relative_to(data_dir.resolve()):
        raise AuditError(
            f"audit.hmac_key_file {path} lies inside the data folder {data_dir}; keep it where "
            "the data folder's writers cannot read it (install.sh --system uses "
            "/etc/appliance/audit.key)"
        )
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise AuditError(f"cannot read audit.hmac_key_file {path}: {exc.strerror}") from exc
    if len(key) < MIN_KEY_BYTES:
        raise AuditError(
            f"audit.hmac_key_file {path} holds {len(key)} bytes; it needs at least "
            f"{MIN_KEY_BYTES} (e.g. head -c 48 /dev/urandom | base64 > {path})"
        )
    return key


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
        or set(record) not in (_FIELDS, _KEYED_FIELDS)
        or ("mac" in record and not isinstance(record["mac"], str))
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
    With ``key`` every record gets a ``mac``; with ``anchor_every`` > 0, ``on_anchor`` is called
    with the :class:`Anchor` after every that many records (and by :meth:`close`, when records
    were written since the last one).
    """

    def __init__(
        self,
        path: Path,
        *,
        fsync: bool = True,
        clock: Callable[[], float] = time.time,
        key: bytes | None = None,
        anchor_every: int = 0,
        on_anchor: Callable[[Anchor], None] | None = None,
    ) -> None:
        self.path = path
        self._fsync = fsync
        self._clock = clock
        self._key = key
        self._anchor_every = anchor_every
        self._on_anchor = on_anchor
        self._unanchored = 0
        self._last: Anchor | None = None
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
            last, pending = self._last, self._unanchored
            self._unanchored = 0
        if last is not None and pending and self._on_anchor is not None:
            self._on_anchor(last)

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
        if user is not None and (not isinstance(user, str) or not valid_user(user)):
            raise AuditError(
                f"invalid audit user {printable(str(user))[:80]!r}: an account name, a local: "
                "identity or None (put a raw attempt in the record's data)"
            )
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
                    if self._key is not None:
                        record["mac"] = record_mac(self._key, record["hash"])
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
            self._last = Anchor(int(record["seq"]), str(record["hash"]))
            self._unanchored += 1
            due = self._anchor_every > 0 and self._unanchored >= self._anchor_every
            if due:
                self._unanchored = 0
        if due and self._on_anchor is not None:
            self._on_anchor(self._last)
        return record


@dataclass(frozen=True)
class Anchor:
    """The newest record's ``seq`` (how many records there are) and ``hash``: kept somewhere
    the appliance cannot write, it later proves that nothing up to it was removed or changed."""

    count: int
    last_hash: str

    def as_json(self) -> dict[str, Any]:
        return {"count": self.count, "last_hash": self.last_hash}

    def line(self) -> str:
        """The journal form, which ``parse_anchor`` reads back."""
        return f"audit anchor count={self.count} last_hash={self.last_hash}"


def parse_anchor(text: str) -> Anchor | str:
    """An anchor from what ``verify --anchor`` is given: a bare hash (returned as is), JSON
    ``{"count", "last_hash"}`` or a journal line ``count=N last_hash=H`` (the last one wins when
    the text holds several, e.g. a journal excerpt)."""
    text = text.strip()
    if _HASH.fullmatch(text):
        return text
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("count"), int):
        digest = data.get("last_hash")
        if isinstance(digest, str) and _HASH.fullmatch(digest):
            return Anchor(int(data["count"]), digest)
    lines = _ANCHOR_LINE.findall(text)
    if lines:
        count, digest = lines[-1]
        return Anchor(int(count), digest)
    raise AuditError(
        "not an audit anchor: give a SHA-256 hash, a file with the JSON of `appliance audit "
        "anchor --json`, or a journal line 'audit anchor count=N last_hash=H'"
    )


@dataclass(frozen=True)
class VerifyResult:
    """``problem`` names the first bad line (1-based) and what is wrong with it; ``last_hash``
    is the anchor to export for notarisation (64 zeros for an empty log)."""

    ok: bool
    records: int
    problem: str | None = None
    last_hash: str = GENESIS
    keyed_from: int | None = None
    """With a key: the seq of the first keyed record (records before it predate the key)."""


def _line_problem(
    line: bytes, expected_seq: int, prev: str, key: bytes | None = None, keyed: bool = False
) -> tuple[str | None, str, bool]:
    """What is wrong with ``line`` as the record after ``prev``, its hash, and whether it is
    keyed (with ``key``: once one record is keyed, every later one must be)."""
    if not line.endswith(b"\n"):
        return "truncated last line (no line end): a write was cut short", prev, keyed
    record = _parse(line)
    if record is None:
        return "garbled line: not a well-formed audit record", prev, keyed
    seq = record["seq"]
    if record["hash"] != record_hash(record):
        return f"record seq {seq} was edited (its hash does not match)", prev, keyed
    if key is not None:
        mac = record.get("mac")
        if mac is None and keyed:
            return f"record seq {seq} has no MAC after keyed records: it was forged", prev, keyed
        if mac is not None and not hmac.compare_digest(str(mac), record_mac(key, record["hash"])):
            return (
                f"record seq {seq} has a wrong MAC: it was forged or the key differs",
                prev,
                keyed,
            )
        keyed = keyed or mac is not None
    if line != (canonical(record) + "\n").encode("utf-8"):
        return f"record seq {seq} was edited (the line is not in canonical form)", prev, keyed
    if seq != expected_seq:
        return (
            f"seq {seq} where {expected_seq} was expected: a line was deleted, inserted or moved",
            prev,
            keyed,
        )
    if record["prev"] != prev:
        return (
            f"record seq {seq} does not follow the line before it (prev hash mismatch): a line "
            "was deleted, inserted or moved",
            prev,
            keyed,
        )
    return None, str(record["hash"]), keyed


def verify(
    path: Path, *, anchor: str | Anchor | None = None, key: bytes | None = None
) -> VerifyResult:
    """Check the whole chain of ``path``. With ``anchor`` (a hash, or an :class:`Anchor` exported
    earlier), also check that the chain still holds that record (at that ``seq``, for an
    :class:`Anchor`): a cut tail or a rewritten chain fails. With ``key``, check the MACs."""
    if isinstance(anchor, str) and not _HASH.fullmatch(anchor):
        return VerifyResult(False, 0, f"the anchor {anchor!r} is not a SHA-256 hex digest")
    try:
        handle = path.open("rb")
    except OSError as exc:
        return VerifyResult(False, 0, f"cannot read the audit log {path}: {exc.strerror}")
    want = anchor.last_hash if isinstance(anchor, Anchor) else anchor
    at = anchor.count if isinstance(anchor, Anchor) else None
    prev, count, anchored, keyed = GENESIS, 0, anchor is None, False
    keyed_from: int | None = None
    with handle:
        for number, line in enumerate(handle, start=1):
            problem, prev, keyed = _line_problem(line, count + 1, prev, key, keyed)
            if problem is not None:
                return VerifyResult(False, count, f"line {number}: {problem}", prev, keyed_from)
            count += 1
            if keyed and keyed_from is None:
                keyed_from = count
            if at is not None and count == at and prev != want:
                return VerifyResult(
                    False,
                    count,
                    f"record seq {at} is not the anchored one (hash {prev[:12]}… where the "
                    f"anchor says {str(want)[:12]}…): the log was rewritten",
                    prev,
                    keyed_from,
                )
            anchored = anchored or prev == want
    if not anchored:
        missing = (
            f"the log holds {count} records and the anchor names record {at}: records up to the "
            "anchor were removed (a cut tail)"
            if at is not None and count < at
            else f"the anchor {want} is not in the chain: records up to it were removed or the "
            "log was rewritten"
        )
        return VerifyResult(False, count, missing, prev, keyed_from)
    return VerifyResult(True, count, None, prev, keyed_from)


def open_audit_log(
    settings: Settings, *, on_anchor: Callable[[Anchor], None] | None = None
) -> AuditLog:
    """The data folder's audit log as the settings configure it (key, anchoring)."""
    audit = settings.audit
    key = (
        load_key(audit.hmac_key_file, settings.data_dir)
        if audit.hmac_key_file is not None
        else None
    )
    return AuditLog(
        settings.audit_path, key=key, anchor_every=audit.anchor_every, on_anchor=on_anchor
    )


def journal_anchor(anchor: Anchor) -> None:
    """Write ``anchor`` to the system log (the journal under systemd: outside the data folder,
    where a later ``verify --anchor`` can take it from) and to the appliance's own log."""
    import syslog

    syslog.openlog("appliance-audit", syslog.LOG_PID, syslog.LOG_AUTH)
    syslog.syslog(syslog.LOG_NOTICE, anchor.line())
    log.info("%s", anchor.line())


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
