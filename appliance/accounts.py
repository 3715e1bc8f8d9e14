"""Accounts: users, groups, collection grants, sign-in throttling and sessions, in SQLite.

Errors (both are :class:`appliance.core.errors.ApplianceError`)::

    ApplianceError
     ├── AuthError      sign-in refused; one generic message, ``reason`` kept for the audit log
     └── AccountError   an account operation was refused (bad name, weak password, last admin)

**Collections and least privilege.** Every top-level subfolder of the documents folder is a
*collection*; admins grant collections to groups, and a user sees the union of their groups'
collections. Documents at the root of the folder belong to the shared collection ``""``, which
every signed-in user sees. Admins are *not* exempt: they, too, see only the collections granted
to their groups in search and answers. They manage the grants, so they can grant themselves what
their work needs, and that grant is an explicit, audited act rather than an implicit privilege.

**Sign-in.** Passwords are hashed with Argon2id (argon2-cffi); a hash made with older parameters
is replaced at the next successful sign-in. Unknown user, wrong password and disabled account
all raise the same :class:`AuthError` message, and an unknown user's password is verified
against a dummy hash so the answer takes as long as for a real one. After ``max_failures``
consecutive failures for a username at one client address (the UI forwards the browser's
address), or for the address alone, attempts within
``lockout_base_s * 2 ** (failures - max_failures)`` seconds (at most 15 minutes) of the last
failure are refused without looking at the password. Throttling by name *and* address means a
guesser locks out only itself, not every admin by name; without an address (a local tool) the
name alone is the key. Each attempt is counted as a failure *before* its password is checked,
in the same transaction as the throttle check, so parallel guesses cannot all slip through
before the first failure lands; a success takes the count back. A sign-in refused only
because of attempts still in progress waits for them to end instead (a burst of staff behind
one address must all get in; a burst of guesses still gets ``max_failures``). At most
``max_concurrent_checks`` Argon2 verifications (64 MiB each) run at once; the rest wait.
Failures older than ``forget_failures_after_s`` are forgotten.

**First sign-in.** An account created with ``must_change=True`` (the first admin, whose random
password was shown once) can do nothing but change its password; the service enforces that.

**Sessions.** A session token is 32 random bytes, url-safe; only its SHA-256 is stored. A
session lasts ``session_ttl_s`` from sign-in (absolute, not sliding) and ends early on sign-out,
when the account is disabled or when its password is set. The role is read at every lookup, so
a role change takes effect at once.

Nothing secret is stored in plain text or logged. One connection guarded by a lock serves the
threads of a process; writes that check and change (the last-admin rule) run in ``BEGIN
IMMEDIATE`` transactions, so several processes may share the file.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from appliance.core import errors, sqlite
from appliance.core.errors import ApplianceError

Role = Literal["staff", "admin"]
ROLES: frozenset[str] = frozenset({"staff", "admin"})
SHARED_COLLECTION = ""
"""The collection of documents at the root of the documents folder; every signed-in user sees it."""

INVALID_LOGIN = "invalid username or password"
MAX_LOCKOUT_S = 15 * 60.0
SETTLE_WAIT_S = 120.0
"""The longest a sign-in waits for attempts in progress to settle before it is throttled."""
MAX_PASSWORD_CHARS = 1024

_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
_MAX_TOKEN_CHARS = 128


class AuthError(errors.AuthError):
    """Sign-in was refused (HTTP 401). ``str(error)`` is safe to show to anyone. ``reason`` is
    for the audit log only, never for the client: "unknown_user", "bad_password", "disabled",
    "throttled" or "changed_during_login". ``retry_after_s`` is set when throttled."""

    def __init__(self, message: str, *, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class AccountError(ApplianceError):
    """An account operation was refused: an invalid or unknown name, a password that breaks
    the policy, or a change that would leave no enabled admin."""


@dataclass(frozen=True)
class Session:
    """A signed-in user. ``expires`` is a Unix time; the token is kept out of ``repr``."""

    token: str = field(repr=False)
    username: str
    role: str
    expires: float
    must_change: bool = False
    """The password must be changed before anything else (a first admin's random one)."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    username TEXT PRIMARY KEY, role TEXT NOT NULL CHECK (role IN ('staff', 'admin')),
    disabled INTEGER NOT NULL DEFAULT 0, password_hash TEXT NOT NULL, created REAL NOT NULL,
    password_changed REAL NOT NULL, last_login REAL);
CREATE TABLE IF NOT EXISTS memberships (
    username TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    grp TEXT NOT NULL, PRIMARY KEY (username, grp));
CREATE TABLE IF NOT EXISTS grants (
    grp TEXT NOT NULL, collection TEXT NOT NULL, PRIMARY KEY (grp, collection));
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY,
    username TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    client TEXT NOT NULL, created REAL NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS failures (
    key TEXT PRIMARY KEY, count INTEGER NOT NULL, last REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions (username);
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires);
CREATE INDEX IF NOT EXISTS memberships_by_group ON memberships (grp);
"""


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def normalise_username(username: str) -> str:
    """The stored form of ``username`` (lower case), or :class:`AccountError` when invalid."""
    if not isinstance(username, str) or not _NAME.fullmatch(username):
        raise AccountError(
            f"invalid username {username!r}: use 1-64 characters among letters, digits and . _ @ -"
        )
    return username.lower()


def _group(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AccountError(
            f"invalid group name {name!r}: use 1-64 characters among letters, digits and . _ @ -"
        )
    return name.lower()


def _collection(name: str) -> str:
    if not isinstance(name, str):
        raise AccountError(f"invalid collection {name!r}: a folder name is a string")
    if name == SHARED_COLLECTION:
        raise AccountError(
            "the shared collection '' (documents at the root of the folder) is visible to every "
            "signed-in user and cannot be granted or revoked"
        )
    if name in {".", ".."} or len(name) > 255 or any(c in name for c in "/\\\0"):
        raise AccountError(
            f"invalid collection {name!r}: name one top-level subfolder of the documents folder"
        )
    return name


def _names(values: Iterable[str] | str) -> list[str]:
    """A lone string is one name, not a sequence of one-letter names."""
    return [values] if isinstance(values, str) else list(values)


class Accounts:
    """Users, groups, grants and sessions in one SQLite file (``DATA/accounts.sqlite3``).

    ``hasher`` defaults to argon2-cffi's ``PasswordHasher()`` (Argon2id, RFC 9106 low-memory
    profile); ``clock`` returns Unix time and is injectable for tests.
    """

    def __init__(
        self,
        path: Path,
        *,
        session_ttl_s: float = 8 * 3600,
        max_failures: int = 5,
        lockout_base_s: float = 1.0,
        forget_failures_after_s: float = 24 * 3600,
        min_password_length: int = 10,
        hasher: PasswordHasher | None = None,
        clock: Callable[[], float] = time.time,
        max_concurrent_checks: int = 2,
    ) -> None:
        if session_ttl_s <= 0 or max_failures < 1 or lockout_base_s < 0 or min_password_length < 1:
            raise AccountError(
                "invalid account settings: session_ttl_s > 0, max_failures >= 1, "
                "lockout_base_s >= 0 and min_password_length >= 1 are required"
            )
        self.session_ttl_s = session_ttl_s
        self.max_failures = max_failures
        self.lockout_base_s = lockout_base_s
        self.forget_failures_after_s = forget_failures_after_s
        self.min_password_length = min_password_length
        self._hasher = hasher or PasswordHasher()
        self._clock = clock
        # Unknown users are checked against this, so they take as long as known ones.
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))
        # The file holds password hashes: owner-only from the start.
        self._db = sqlite.connect(path, _SCHEMA, durable=True, private=True)
        self._lock = threading.Lock()
        self._checks = threading.BoundedSemaphore(max(1, max_concurrent_checks))
        self._settled = threading.Condition()  # an attempt in progress ended
        self._in_flight: dict[str, int] = {}  # attempts in progress per throttling key
        columns = {str(r[1]) for r in self._db.execute("PRAGMA table_info(users)")}
        if "must_change" not in columns:  # a data folder from before first-sign-in changes
            with self._write() as db:
                db.execute("ALTER TABLE users ADD COLUMN must_change INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Accounts:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken before reading so check-then-change is atomic."""
        with sqlite.write(self._db, self._lock) as db:
            yield db

    # --- users -------------------------------------------------------------------------------

    def _check_password(self, username: str, password: str) -> None:
        if not isinstance(password, str):
            raise AccountError("a password must be a string")
        if len(password) < self.min_password_length:
            raise AccountError(
                f"the password is too short: use at least {self.min_password_length} characters"
            )
        if len(password) > MAX_PASSWORD_CHARS:
            raise AccountError(
                f"the password is too long: use at most {MAX_PASSWORD_CHARS} characters"
            )
        if password.lower() == username.lower():
            raise AccountError("the password must not be the username")

    def _check_role(self, role: str) -> None:
        if role not in ROLES:
            raise AccountError(f"invalid role {role!r}: use one of {sorted(ROLES)}")

    def _require_user(self, db: sqlite3.Connection, name: str) -> tuple[str, bool]:
        row = db.execute("SELECT role, disabled FROM users WHERE username = ?", (name,)).fetchone()
        if row is None:
            raise AccountError(f"no user {name!r}")
        return str(row[0]), bool(row[1])

    def _enabled_admins(self, db: sqlite3.Connection) -> int:
        row = db.execute("SELECT COUNT(*) FROM users WHERE role = 'admin' AND disabled = 0")
        return int(row.fetchone()[0])

    def add_user(
        self,
        username: str,
        password: str,
        role: str = "staff",
        groups: Iterable[str] | str = (),
        *,
        must_change: bool = False,
    ) -> dict[str, Any]:
        """Create a user; ``username`` is matched without regard to case and stored lower-case.
        ``must_change``: the user must set a new password at first sign-in."""
        name = normalise_username(username)
        self._check_role(role)
        self._check_password(name, password)
        member_of = sorted({_group(g) for g in _names(groups)})
        password_hash = self._hasher.hash(password)
        now = self._clock()
        with self._write() as db:
            if db.execute("SELECT 1 FROM users WHERE username = ?", (name,)).fetchone():
                raise AccountError(f"user {name!r} already exists")
            db.execute(
                "INSERT INTO users (username, role, disabled, password_hash, created, "
                "password_changed, must_change) VALUES (?, ?, 0, ?, ?, ?, ?)",
                (name, role, password_hash, now, now, int(must_change)),
            )
            db.executemany(
                "INSERT INTO memberships (username, grp) VALUES (?, ?)",
                [(name, g) for g in member_of],
            )
        user = self.user(name)
        assert user is not None
        return user

    def set_password(self, username: str, password: str, *, keep_token: str | None = None) -> None:
        """Set a new password and end the user's sessions (except ``keep_token``'s, for a user
        who changes their own password while signed in)."""
        name = normalise_username(username)
        self._check_password(name, password)
        password_hash = self._hasher.hash(password)
        with self._write() as db:
            self._require_user(db, name)
            db.execute(
                "UPDATE users SET password_hash = ?, password_changed = ?, must_change = 0 "
                "WHERE username = ?",
                (password_hash, self._clock(), name),
            )
            self._end_sessions(db, name, keep_token)

    def change_password(self, token: str, old: str, new: str) -> str:
        """The signed-in user of ``token`` sets a new password, proving the old one; their other
        sessions end, this one stays. Returns the username."""
        session = self.session(token)
        if session is None:
            raise AuthError("not signed in, or the session expired", reason="no_session")
        if old == new:
            raise AccountError("the new password must differ from the current one")
        with self._lock:
            row = self._db.execute(
                "SELECT password_hash FROM users WHERE username = ?", (session.username,)
            ).fetchone()
        if row is None or not self._verify(str(row[0]), old):
            raise AuthError("the current password is wrong", reason="bad_password")
        self.set_password(session.username, new, keep_token=token)
        return session.username

    def set_role(self, username: str, role: str) -> None:
        name = normalise_username(username)
        self._check_role(role)
        with self._write() as db:
            current, disabled = self._require_user(db, name)
            if current == "admin" and role != "admin" and not disabled:
                self._refuse_last_admin(db, name, "demote")
            db.execute("UPDATE users SET role = ? WHERE username = ?", (role, name))

    def set_disabled(self, username: str, disabled: bool) -> None:
        """Disable (and sign out everywhere) or re-enable a user."""
        name = normalise_username(username)
        with self._write() as db:
            role, _ = self._require_user(db, name)
            if disabled and role == "admin":
                self._refuse_last_admin(db, name, "disable")
            db.execute(
                "UPDATE users SET disabled = ? WHERE username = ?", (int(bool(disabled)), name)
            )
            if disabled:
                self._end_sessions(db, name, None)

    def _refuse_last_admin(self, db: sqlite3.Connection, name: str, action: str) -> None:
        row = db.execute(
            "SELECT COUNT(*) FROM users WHERE role = 'admin' AND disabled = 0 AND username != ?",
            (name,),
        ).fetchone()
        if int(row[0]) == 0:
            raise AccountError(
                f"cannot {action} {name!r}: it is the last enabled admin; make another user an "
                "admin first"
            )

    def set_groups(self, username: str, groups: Iterable[str] | str) -> None:
        """Replace the user's group memberships."""
        name = normalise_username(username)
        member_of = sorted({_group(g) for g in _names(groups)})
        with self._write() as db:
            self._require_user(db, name)
            db.execute("DELETE FROM memberships WHERE username = ?", (name,))
            db.executemany(
                "INSERT INTO memberships (username, grp) VALUES (?, ?)",
                [(name, g) for g in member_of],
            )

    def _users(self, name: str | None) -> list[dict[str, Any]]:
        where, params = ("WHERE username = ?", (name,)) if name is not None else ("", ())
        with self._lock:
            rows = self._db.execute(
                "SELECT username, role, disabled, created, password_changed, last_login "
                f"FROM users {where} ORDER BY username",
                params,
            ).fetchall()
            memberships: dict[str, list[str]] = {}
            for user, grp in self._db.execute(
                "SELECT username, grp FROM memberships ORDER BY grp"
            ).fetchall():
                memberships.setdefault(user, []).append(grp)
        return [
            {
                "username": r[0],
                "role": r[1],
                "disabled": bool(r[2]),
                "groups": memberships.get(r[0], []),
                "created": r[3],
                "password_changed": r[4],
                "last_login": r[5],
            }
            for r in rows
        ]

    def users(self) -> list[dict[str, Any]]:
        """Every user, without password hashes, sorted by name."""
        return self._users(None)

    def user(self, username: str) -> dict[str, Any] | None:
        try:
            name = normalise_username(username)
        except AccountError:
            return None
        found = self._users(name)
        return found[0] if found else None

    def count_admins(self) -> int:
        """Enabled admins."""
        with self._lock:
            return self._enabled_admins(self._db)

    # --- groups and grants ---------------------------------------------------------------------

    def grant(self, group: str, collections: Iterable[str] | str) -> None:
        """Let members of ``group`` see ``collections`` (top-level subfolder names)."""
        grp = _group(group)
        names = sorted({_collection(c) for c in _names(collections)})
        with self._write() as db:
            db.executemany(
                "INSERT OR IGNORE INTO grants (grp, collection) VALUES (?, ?)",
                [(grp, c) for c in names],
            )

    def revoke(self, group: str, collections: Iterable[str] | str) -> None:
        grp = _group(group)
        names = sorted({_collection(c) for c in _names(collections)})
        with self._write() as db:
            db.executemany(
                "DELETE FROM grants WHERE grp = ? AND collection = ?", [(grp, c) for c in names]
            )

    def groups(self) -> dict[str, list[str]]:
        """Every group that has a grant or a member, with its sorted collections."""
        with self._lock:
            granted = self._db.execute(
                "SELECT grp, collection FROM grants ORDER BY grp, collection"
            ).fetchall()
            members = self._db.execute("SELECT DISTINCT grp FROM memberships").fetchall()
        out: dict[str, list[str]] = {str(g): [] for (g,) in members}
        for grp, collection in granted:
            out.setdefault(grp, []).append(collection)
        return dict(sorted(out.items()))

    def collections_for(self, username: str) -> set[str]:
        """The collections ``username`` may see: the shared ``""`` plus their groups' grants.
        An unknown or disabled user sees nothing (the empty set)."""
        try:
            name = normalise_username(username)
        except AccountError:
            return set()
        with self._lock:
            row = self._db.execute(
                "SELECT disabled FROM users WHERE username = ?", (name,)
            ).fetchone()
            if row is None or row[0]:
                return set()
            rows = self._db.execute(
                "SELECT DISTINCT g.collection FROM grants g JOIN memberships m ON m.grp = g.grp "
                "WHERE m.username = ?",
                (name,),
            ).fetchall()
        return {SHARED_COLLECTION} | {str(r[0]) for r in rows}

    # --- sign-in and sessions ------------------------------------------------------------------

    def _failure_keys(self, name: str, client: str) -> list[str]:
        if not client:
            return [f"user:{name[:64]}"]
        return [f"pair:{name[:64]}@{client[:128]}", f"client:{client[:128]}"]

    def _retry_after(self, db: sqlite3.Connection, keys: list[str], now: float) -> float:
        """Seconds until the strictest lockout among ``keys`` ends; 0 when none applies."""
        wait = 0.0
        for key in keys:
            row = db.execute("SELECT count, last FROM failures WHERE key = ?", (key,)).fetchone()
            if row is None or now - row[1] > self.forget_failures_after_s:
                continue
            count, last = int(row[0]), float(row[1])
            if count < self.max_failures:
                continue
            exponent = min(count - self.max_failures, 32)
            window = min(self.lockout_base_s * 2.0**exponent, MAX_LOCKOUT_S)
            wait = max(wait, last + window - now)
        return wait

    def _count_attempt(self, keys: list[str], now: float) -> float:
        """Throttle check and a pessimistic failure count, in one transaction: 0 when the
        attempt may go on (and is now counted as failed until it succeeds), else the wait."""
        with self._write() as db:
            db.execute("DELETE FROM failures WHERE last < ?", (now - self.forget_failures_after_s,))
            wait = self._retry_after(db, keys, now)
            if wait > 0:
                return wait
            db.executemany(
                "INSERT INTO failures (key, count, last) VALUES (?, 1, ?) "
                "ON CONFLICT (key) DO UPDATE SET count = count + 1, last = excluded.last",
                [(key, now) for key in keys],
            )
        return 0.0

    def _verify(self, stored: str, password: str) -> bool:
        with self._checks:  # Argon2 takes 64 MiB per check: a burst must not take them all
            try:
                return bool(self._hasher.verify(stored, password))
            except (VerificationError, InvalidHashError):
                return False

    def login(self, username: str, password: str, *, client: str = "") -> Session:
        """Check the password and open a session, or raise :class:`AuthError`.

        ``client`` is the end user's address: the UI forwards the browser's. Pass "" only
        where there is none (a local tool); then the username alone is throttled.
        """
        name = username.lower() if isinstance(username, str) else ""
        keys = self._failure_keys(name, client)
        now = self._admit_attempt(keys)
        try:
            return self._login(name, password, client, keys, now)
        finally:
            with self._settled:
                for key in keys:
                    self._in_flight[key] -= 1
                    if not self._in_flight[key]:
                        del self._in_flight[key]
                self._settled.notify_all()

    def _admit_attempt(self, keys: list[str]) -> float:
        """Count the attempt (pessimistically, see the module docstring) and return its time,
        or raise the throttled :class:`AuthError`. A lockout that attempts still in progress
        could lift (their pessimistic counts, taken back when they succeed) is waited out, not
        refused: fifty staff signing in at once behind one address (the UI behind a proxy or
        an office NAT) were otherwise refused after the fifth. A guesser gains nothing by it:
        once those attempts have failed, the lockout stands and the waiters are refused."""
        deadline = time.monotonic() + SETTLE_WAIT_S
        with self._settled:
            while True:
                now = self._clock()
                wait = self._count_attempt(keys, now)
                if wait <= 0:
                    for key in keys:
                        self._in_flight[key] = self._in_flight.get(key, 0) + 1
                    return now
                left = deadline - time.monotonic()
                if left <= 0 or not any(key in self._in_flight for key in keys):
                    raise AuthError(
                        f"too many failed attempts; try again in {math.ceil(wait)} s",
                        reason="throttled",
                        retry_after_s=wait,
                    )
                self._settled.wait(min(left, 5.0))

    def _login(self, name: str, password: str, client: str, keys: list[str], now: float) -> Session:
        with self._lock:
            row = (
                self._db.execute(
                    "SELECT password_hash, disabled, role, password_changed, must_change "
                    "FROM users WHERE username = ?",
                    (name,),
                ).fetchone()
                if _NAME.fullmatch(name)
                else None
            )
        if not isinstance(password, str) or len(password) > MAX_PASSWORD_CHARS:
            raise AuthError(INVALID_LOGIN, reason="bad_password" if row else "unknown_user")
        stored = str(row[0]) if row else self._dummy_hash
        matched = self._verify(stored, password)
        if row is None:
            raise AuthError(INVALID_LOGIN, reason="unknown_user")
        if not matched:
            raise AuthError(INVALID_LOGIN, reason="bad_password")
        if row[1]:
            raise AuthError(INVALID_LOGIN, reason="disabled")
        rehashed = self._hasher.hash(password) if self._hasher.check_needs_rehash(stored) else None
        token = secrets.token_urlsafe(32)
        expires = now + self.session_ttl_s
        with self._write() as db:
            # The account may have been disabled or given a new password while we hashed.
            still = db.execute(
                "SELECT 1 FROM users WHERE username = ? AND disabled = 0 AND password_changed = ?",
                (name, row[3]),
            ).fetchone()
            if still is None:
                raise AuthError(INVALID_LOGIN, reason="changed_during_login")
            db.executemany("DELETE FROM failures WHERE key = ?", [(key,) for key in keys])
            db.execute("DELETE FROM sessions WHERE expires <= ?", (now,))
            db.execute("UPDATE users SET last_login = ? WHERE username = ?", (now, name))
            if rehashed is not None:
                db.execute(
                    "UPDATE users SET password_hash = ? WHERE username = ? AND password_hash = ?",
                    (rehashed, name, stored),
                )
            db.execute(
                "INSERT INTO sessions (token_hash, username, client, created, expires) "
                "VALUES (?, ?, ?, ?, ?)",
                (_token_hash(token), name, client[:128], now, expires),
            )
        return Session(
            token=token,
            username=name,
            role=str(row[2]),
            expires=expires,
            must_change=bool(row[4]),
        )

    def session(self, token: str) -> Session | None:
        """The live session of ``token``; None when unknown, expired or its user is disabled."""
        if not isinstance(token, str) or not token or len(token) > _MAX_TOKEN_CHARS:
            return None
        digest = _token_hash(token)
        now = self._clock()
        with self._lock:
            row = self._db.execute(
                "SELECT s.username, s.expires, u.role, u.disabled, u.must_change FROM sessions s "
                "JOIN users u ON u.username = s.username WHERE s.token_hash = ?",
                (digest,),
            ).fetchone()
            if row is None:
                return None
            if row[1] <= now or row[3]:
                self._db.execute("DELETE FROM sessions WHERE token_hash = ?", (digest,))
                return None
        return Session(
            token=token,
            username=str(row[0]),
            role=str(row[2]),
            expires=float(row[1]),
            must_change=bool(row[4]),
        )

    def logout(self, token: str) -> str | None:
        """End the session of ``token``; the username it belonged to, or None if none."""
        if not isinstance(token, str) or not token or len(token) > _MAX_TOKEN_CHARS:
            return None
        digest = _token_hash(token)
        with self._write() as db:
            row = db.execute(
                "SELECT username FROM sessions WHERE token_hash = ?", (digest,)
            ).fetchone()
            db.execute("DELETE FROM sessions WHERE token_hash = ?", (digest,))
        return str(row[0]) if row else None

    def _end_sessions(self, db: sqlite3.Connection, name: str, keep_token: str | None) -> int:
        keep = _token_hash(keep_token) if keep_token else ""
        cursor = db.execute(
            "DELETE FROM sessions WHERE username = ? AND token_hash != ?", (name, keep)
        )
        return cursor.rowcount

    def end_sessions(self, username: str, *, keep_token: str | None = None) -> int:
        """End every session of ``username`` (except ``keep_token``'s); how many ended."""
        name = normalise_username(username)
        with self._write() as db:
            return self._end_sessions(db, name, keep_token)
