"""Accounts over a real SQLite file, with cheap Argon2id parameters and an injected clock."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from appliance.accounts import INVALID_LOGIN, AccountError, Accounts, AuthError
from appliance.core.errors import ApplianceError

PASSWORD = "correct horse battery"


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cheap_hasher(time_cost: int = 1) -> PasswordHasher:
    return PasswordHasher(time_cost=time_cost, memory_cost=8, parallelism=1)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "accounts.sqlite3"


@pytest.fixture
def accounts(path: Path, clock: Clock) -> Iterator[Accounts]:
    with Accounts(
        path,
        session_ttl_s=3600,
        max_failures=3,
        lockout_base_s=10,
        hasher=cheap_hasher(),
        clock=clock,
    ) as acc:
        acc.add_user("root", PASSWORD, role="admin")
        acc.add_user("alice", PASSWORD, groups=["finance"])
        yield acc


def stored_hashes(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [r[0] for r in db.execute("SELECT password_hash FROM users")]


def test_add_and_login(accounts: Accounts, clock: Clock) -> None:
    session = accounts.login("alice", PASSWORD, client="10.0.0.5")
    assert session.username == "alice"
    assert session.role == "staff"
    assert session.expires == clock.now + 3600
    assert len(session.token) >= 43
    assert session.token not in repr(session)
    assert accounts.session(session.token) == session
    assert accounts.user("alice")["last_login"] == clock.now  # type: ignore[index]


def test_wrong_password_unknown_user_and_disabled_share_one_message(accounts: Accounts) -> None:
    accounts.add_user("bob", PASSWORD)
    accounts.set_disabled("bob", True)
    reasons = []
    for username, password in [
        ("alice", "wrong password!"),
        ("nobody", PASSWORD),
        ("bob", PASSWORD),
        ("not a valid name!", PASSWORD),
    ]:
        with pytest.raises(AuthError) as caught:
            accounts.login(username, password)
        assert str(caught.value) == INVALID_LOGIN
        assert isinstance(caught.value, ApplianceError)
        reasons.append(caught.value.reason)
    assert reasons == ["bad_password", "unknown_user", "disabled", "unknown_user"]


def test_disabling_ends_sessions_and_blocks_login(accounts: Accounts) -> None:
    first = accounts.login("alice", PASSWORD)
    second = accounts.login("alice", PASSWORD)
    accounts.set_disabled("alice", True)
    assert accounts.session(first.token) is None
    assert accounts.session(second.token) is None
    with pytest.raises(AuthError, match=INVALID_LOGIN):
        accounts.login("alice", PASSWORD)
    assert accounts.collections_for("alice") == set()
    accounts.set_disabled("alice", False)
    assert accounts.login("alice", PASSWORD).username == "alice"


def test_session_expiry_logout_and_end_sessions(accounts: Accounts, clock: Clock) -> None:
    session = accounts.login("alice", PASSWORD)
    clock.now += 3599
    assert accounts.session(session.token) is not None
    clock.now += 1
    assert accounts.session(session.token) is None

    session = accounts.login("alice", PASSWORD)
    assert accounts.logout(session.token) == "alice"
    assert accounts.session(session.token) is None
    assert accounts.logout(session.token) is None
    assert accounts.session("") is None
    assert accounts.session("not-a-token") is None

    one, two = accounts.login("alice", PASSWORD), accounts.login("alice", PASSWORD)
    assert accounts.end_sessions("ALICE", keep_token=one.token) == 1
    assert accounts.session(one.token) is not None
    assert accounts.session(two.token) is None


def test_only_token_hashes_are_stored(accounts: Accounts, path: Path) -> None:
    session = accounts.login("alice", PASSWORD)
    wal = Path(f"{path}-wal")
    raw = path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    assert session.token.encode() not in raw
    assert PASSWORD.encode() not in raw


def test_password_change_ends_other_sessions(accounts: Accounts) -> None:
    mine, other = accounts.login("alice", PASSWORD), accounts.login("alice", PASSWORD)
    accounts.set_password("alice", "a new long password", keep_token=mine.token)
    assert accounts.session(mine.token) is not None
    assert accounts.session(other.token) is None
    with pytest.raises(AuthError):
        accounts.login("alice", PASSWORD)
    assert accounts.login("alice", "a new long password").username == "alice"


def test_role_change_takes_effect_in_live_sessions(accounts: Accounts) -> None:
    session = accounts.login("alice", PASSWORD)
    accounts.set_role("alice", "admin")
    assert accounts.session(session.token).role == "admin"  # type: ignore[union-attr]


def test_throttling_after_failures_and_reset_after_success(
    accounts: Accounts, clock: Clock
) -> None:
    for _ in range(3):
        with pytest.raises(AuthError, match=INVALID_LOGIN):
            accounts.login("alice", "wrong password!")
    # Locked for 10 s: even the right password is not looked at.
    with pytest.raises(AuthError, match=r"too many failed attempts; try again in 10 s") as caught:
        accounts.login("alice", PASSWORD)
    assert caught.value.reason == "throttled"
    assert caught.value.retry_after_s == pytest.approx(10)
    clock.now += 10
    with pytest.raises(AuthError, match=INVALID_LOGIN):
        accounts.login("alice", "wrong password!")
    # The window doubles with each further failure.
    clock.now += 19
    with pytest.raises(AuthError, match=r"try again in 1 s"):
        accounts.login("alice", PASSWORD)
    clock.now += 1
    assert accounts.login("alice", PASSWORD).username == "alice"
    # The success reset the counter: two more failures do not lock.
    for _ in range(2):
        with pytest.raises(AuthError, match=INVALID_LOGIN):
            accounts.login("alice", "wrong password!")
    assert accounts.login("alice", PASSWORD).username == "alice"


def test_lockout_is_capped_at_15_minutes(accounts: Accounts, clock: Clock) -> None:
    for _ in range(3):
        with pytest.raises(AuthError, match=INVALID_LOGIN):
            accounts.login("alice", "wrong password!")
    for _ in range(12):
        clock.now += 900
        with pytest.raises(AuthError, match=INVALID_LOGIN):
            accounts.login("alice", "wrong password!")
    with pytest.raises(AuthError, match=r"try again in 900 s"):
        accounts.login("alice", PASSWORD)


def test_unknown_users_are_throttled_like_known_ones(accounts: Accounts) -> None:
    for _ in range(3):
        with pytest.raises(AuthError, match=INVALID_LOGIN):
            accounts.login("nobody", "wrong password!")
    with pytest.raises(AuthError, match="too many failed attempts"):
        accounts.login("nobody", "wrong password!")


def test_throttling_by_client_address(accounts: Accounts) -> None:
    accounts.add_user("bob", PASSWORD)
    for name in ("alice", "bob", "nobody"):
        with pytest.raises(AuthError, match=INVALID_LOGIN):
            accounts.login(name, "wrong password!", client="10.0.0.9")
    with pytest.raises(AuthError, match="too many failed attempts"):
        accounts.login("root", PASSWORD, client="10.0.0.9")
    assert accounts.login("root", PASSWORD, client="10.0.0.10").username == "root"


def test_failures_survive_reopening(path: Path, clock: Clock) -> None:
    with Accounts(path, max_failures=2, hasher=cheap_hasher(), clock=clock) as acc:
        acc.add_user("alice", PASSWORD)
        for _ in range(2):
            with pytest.raises(AuthError, match=INVALID_LOGIN):
                acc.login("alice", "wrong password!")
    with (
        Accounts(path, max_failures=2, hasher=cheap_hasher(), clock=clock) as acc,
        pytest.raises(AuthError, match="too many failed attempts"),
    ):
        acc.login("alice", PASSWORD)


def test_last_enabled_admin_is_protected(accounts: Accounts) -> None:
    assert accounts.count_admins() == 1
    with pytest.raises(AccountError, match="last enabled admin"):
        accounts.set_disabled("root", True)
    with pytest.raises(AccountError, match="last enabled admin"):
        accounts.set_role("Root", "staff")
    accounts.add_user("second", PASSWORD, role="admin")
    assert accounts.count_admins() == 2
    accounts.set_role("root", "staff")
    assert accounts.count_admins() == 1
    with pytest.raises(AccountError, match="last enabled admin"):
        accounts.set_disabled("second", True)
    accounts.set_disabled("alice", True)
    assert accounts.user("second")["role"] == "admin"  # type: ignore[index]


def test_grants_union_and_shared_collection(accounts: Accounts) -> None:
    accounts.grant("finance", ["Reports", "Budgets"])
    accounts.grant("legal", "Contracts")
    accounts.grant("hr", ["People"])
    accounts.set_groups("alice", ["finance", "legal"])
    assert accounts.collections_for("alice") == {"", "Reports", "Budgets", "Contracts"}
    # Admins are not exempt: no grant, only the shared collection.
    assert accounts.collections_for("root") == {""}
    assert accounts.collections_for("nobody") == set()
    accounts.revoke("finance", ["Budgets"])
    assert accounts.collections_for("ALICE") == {"", "Reports", "Contracts"}
    assert accounts.groups() == {
        "finance": ["Reports"],
        "hr": ["People"],
        "legal": ["Contracts"],
    }
    assert accounts.user("alice")["groups"] == ["finance", "legal"]  # type: ignore[index]
    for bad in ["", "..", "a/b"]:
        with pytest.raises(AccountError):
            accounts.grant("finance", [bad])
    with pytest.raises(AccountError, match="invalid group"):
        accounts.grant("fin ance", ["Reports"])


def test_password_policy(accounts: Accounts, path: Path, clock: Clock) -> None:
    with pytest.raises(AccountError, match="too short"):
        accounts.add_user("carol", "short")
    with pytest.raises(AccountError, match="must not be the username"):
        accounts.add_user("carol.lastname", "Carol.Lastname")
    with pytest.raises(AccountError, match="too short"):
        accounts.set_password("alice", "123456789")
    with pytest.raises(AccountError, match="too long"):
        accounts.add_user("carol", "x" * 2000)
    with Accounts(path, min_password_length=16, hasher=cheap_hasher(), clock=clock) as strict:
        with pytest.raises(AccountError, match="at least 16"):
            strict.add_user("carol", "fifteen chars!!")
        strict.add_user("carol", "sixteen chars!!!")


def test_usernames_are_validated_and_case_insensitive(accounts: Accounts) -> None:
    accounts.add_user("Dave.Smith@corp", PASSWORD)
    assert accounts.user("dave.smith@CORP")["username"] == "dave.smith@corp"  # type: ignore[index]
    with pytest.raises(AccountError, match="already exists"):
        accounts.add_user("DAVE.SMITH@corp", PASSWORD)
    assert accounts.login("DAVE.smith@corp", PASSWORD).username == "dave.smith@corp"
    for bad in ["", "a" * 65, "has space", "semi;colon", "quote'"]:
        with pytest.raises(AccountError, match="invalid username"):
            accounts.add_user(bad, PASSWORD)
    with pytest.raises(AccountError, match="no user"):
        accounts.set_role("ghost", "admin")
    with pytest.raises(AccountError, match="invalid role"):
        accounts.set_role("alice", "superuser")


def test_hashes_are_argon2id_and_never_returned(accounts: Accounts, path: Path) -> None:
    hashes = stored_hashes(path)
    assert len(hashes) == 2
    assert all(h.startswith("$argon2id$") for h in hashes)
    listed = repr(accounts.users()) + repr(accounts.user("alice"))
    assert "argon2" not in listed
    assert set(accounts.users()[0]) == {
        "username",
        "role",
        "disabled",
        "groups",
        "created",
        "password_changed",
        "last_login",
    }


def test_rehash_on_login_when_parameters_change(
    accounts: Accounts, path: Path, clock: Clock
) -> None:
    assert all("t=1," in h for h in stored_hashes(path))
    with Accounts(path, hasher=cheap_hasher(time_cost=2), clock=clock) as stronger:
        stronger.login("alice", PASSWORD)
    hashes = {h for h in stored_hashes(path) if "t=2," in h}
    assert len(hashes) == 1
    with Accounts(path, hasher=cheap_hasher(time_cost=2), clock=clock) as stronger:
        assert stronger.login("alice", PASSWORD).username == "alice"


def test_database_file_is_owner_only(accounts: Accounts, path: Path) -> None:
    assert path.stat().st_mode & 0o777 == 0o600


# --- issue 13: sign-in under attack ------------------------------------------------------------


class CountingHasher(PasswordHasher):
    """A real Argon2id hasher that records how many verifications run at once."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        import threading

        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        import time

        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            time.sleep(0.02)  # widen the window in which parallel checks would overlap
            return super().verify(hash, password)
        finally:
            with self.lock:
                self.running -= 1


def test_parallel_guesses_are_all_counted_and_argon2_is_bounded(path: Path, clock: Clock) -> None:
    """Each attempt counts as a failure before its password is checked: 30 parallel guesses
    cannot all be tried before the first failure lands, and at most 2 hashes run at once."""
    from concurrent.futures import ThreadPoolExecutor

    hasher = CountingHasher()
    with Accounts(path, max_failures=3, lockout_base_s=60, hasher=hasher, clock=clock) as accounts:
        accounts.add_user("root", PASSWORD, role="admin")

        def guess(n: int) -> str:
            try:
                accounts.login("root", f"wrong password {n}", client="10.0.0.9")
            except AuthError as exc:
                return exc.reason
            return "signed in"

        with ThreadPoolExecutor(max_workers=30) as pool:
            reasons = list(pool.map(guess, range(30)))
        assert reasons.count("bad_password") == 3  # only max_failures guesses were checked
        assert reasons.count("throttled") == 27
        assert hasher.peak <= 2


def test_a_burst_of_right_passwords_from_one_address_all_signs_in(path: Path, clock: Clock) -> None:
    """Staff behind one address (a proxy, an office NAT) signing in at once: the attempts in
    progress count as failures until they succeed, so the sixth would be throttled; it waits
    for them instead. Guesses of other names from that address are still held to the limit."""
    from concurrent.futures import ThreadPoolExecutor

    hasher = CountingHasher()
    with Accounts(path, max_failures=3, lockout_base_s=60, hasher=hasher, clock=clock) as accounts:
        for n in range(20):
            accounts.add_user(f"staff{n}", f"{PASSWORD}-{n}", role="staff")

        def sign_in(n: int) -> str:
            try:
                accounts.login(f"staff{n}", f"{PASSWORD}-{n}", client="10.0.0.9")
            except AuthError as exc:
                return exc.reason
            return "signed in"

        with ThreadPoolExecutor(max_workers=20) as pool:
            assert list(pool.map(sign_in, range(20))) == ["signed in"] * 20

        def guess(n: int) -> str:
            try:
                accounts.login(f"staff{n}", "wrong password", client="10.0.0.9")
            except AuthError as exc:
                return exc.reason
            return "signed in"

        with ThreadPoolExecutor(max_workers=20) as pool:
            reasons = list(pool.map(guess, range(20)))
        assert reasons.count("bad_password") == 3
        assert reasons.count("throttled") == 17


def test_a_guesser_locks_out_only_itself(accounts: Accounts) -> None:
    for _ in range(3):
        with pytest.raises(AuthError):
            accounts.login("root", "wrong password!", client="203.0.113.7")
    with pytest.raises(AuthError) as refused:
        accounts.login("root", PASSWORD, client="203.0.113.7")
    assert refused.value.reason == "throttled"
    # The admin at their own address still signs in.
    assert accounts.login("root", PASSWORD, client="10.0.0.5").username == "root"


def test_first_sign_in_must_change_the_password(accounts: Accounts) -> None:
    accounts.add_user("admin", "random initial pw", role="admin", must_change=True)
    session = accounts.login("admin", "random initial pw", client="10.0.0.5")
    assert session.must_change
    assert accounts.session(session.token).must_change  # type: ignore[union-attr]
    with pytest.raises(AuthError):
        accounts.change_password(session.token, "not the password", "a new passphrase")
    with pytest.raises(AccountError):
        accounts.change_password(session.token, "random initial pw", "random initial pw")
    assert accounts.change_password(session.token, "random initial pw", "a new passphrase")
    assert not accounts.session(session.token).must_change  # type: ignore[union-attr]
    assert not accounts.login("admin", "a new passphrase").must_change


def test_old_databases_gain_the_must_change_column(path: Path, clock: Clock) -> None:
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE users (username TEXT PRIMARY KEY, role TEXT NOT NULL, "
            "disabled INTEGER NOT NULL DEFAULT 0, password_hash TEXT NOT NULL, "
            "created REAL NOT NULL, password_changed REAL NOT NULL, last_login REAL);"
        )
    with Accounts(path, hasher=cheap_hasher(), clock=clock) as accounts:
        accounts.add_user("bob", PASSWORD)
        assert not accounts.login("bob", PASSWORD).must_change
