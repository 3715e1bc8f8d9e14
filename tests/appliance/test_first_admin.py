"""The first admin of a fresh install: a password shown only on a terminal, changed at once."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from appliance.accounts import Accounts
from appliance.core.audit import AuditLog, read
from appliance.first_admin import INITIAL_PASSWORD_FILE, ensure_first_admin


class Stderr(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.mark.parametrize("tty", [True, False])
def test_the_password_reaches_only_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tty: bool
) -> None:
    stderr = Stderr(tty)
    monkeypatch.setattr("sys.stderr", stderr)
    hasher = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    with (
        Accounts(tmp_path / "accounts.sqlite3", hasher=hasher) as accounts,
        AuditLog(tmp_path / "audit.jsonl") as audit,
    ):
        path = ensure_first_admin(accounts, audit, tmp_path)
        assert path == tmp_path / INITIAL_PASSWORD_FILE
        password = path.read_text().strip()
        assert path.stat().st_mode & 0o777 == 0o600
        assert (password in stderr.getvalue()) is tty
        assert str(path) in stderr.getvalue()
        session = accounts.login("admin", password)
        assert session.must_change
        assert ensure_first_admin(accounts, audit, tmp_path) is None  # only once
    assert [r["user"] for r in read(tmp_path / "audit.jsonl")] == ["local:install"]
