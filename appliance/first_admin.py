"""The first admin of a fresh install, whose random password must be replaced at first sign-in.

On a fresh install nobody can sign in, so the core service creates ``admin`` with a random
password. The password is shown once, on an interactive terminal only (never to a log or the
journal, where it would outlive its use), and kept in ``DATA/initial-admin-password`` (0600) for
an IT person who started the service without a terminal. The account must change it at first
sign-in, and the file is deleted as soon as that password is changed, by any route.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.accounts import Accounts
    from appliance.core.audit import AuditLog

INITIAL_PASSWORD_FILE = "initial-admin-password"
FIRST_ADMIN = "admin"


def ensure_first_admin(
    accounts: Accounts | None, audit: AuditLog | None, data_dir: Path
) -> Path | None:
    """Create the first admin when there are no accounts; the password file's path, if made."""
    if accounts is None or accounts.users():
        return None
    password = secrets.token_urlsafe(12)
    accounts.add_user(FIRST_ADMIN, password, role="admin", must_change=True)
    path = data_dir / INITIAL_PASSWORD_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    if audit is not None:
        audit.record(
            "admin", "local:install", action="user_create", target=FIRST_ADMIN, role="admin"
        )
    if sys.stderr.isatty():
        shown = f"with password {password} (also in {path})"
    else:  # a service's stderr is the journal: say where, never what
        shown = f"with a random password in {path}"
    print(
        f"first start: created the user '{FIRST_ADMIN}' {shown}; it must be changed at first "
        "sign-in. Or add your own admin with `appliance users add NAME --admin`.",
        file=sys.stderr,
    )
    return path


def forget_initial_password(data_dir: Path, username: str) -> None:
    """The first admin's password was changed: its file has served its purpose."""
    if username == FIRST_ADMIN:
        with contextlib.suppress(FileNotFoundError):
            (data_dir / INITIAL_PASSWORD_FILE).unlink()
