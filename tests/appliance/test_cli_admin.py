"""`appliance users` and `appliance audit`: the first admin, grants, and a tamper check."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.settings import load_settings


def run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *argv: str, stdin: str = ""
) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_users_and_audit_commands(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, hermetic_env: Path
) -> None:
    code, out, err = run(
        capsys,
        monkeypatch,
        "users",
        "add",
        "Alice",
        "--admin",
        "--password-stdin",
        stdin="a long passphrase\n",
    )
    assert code == 0, err
    assert "added admin alice" in out
    assert (
        run(
            capsys,
            monkeypatch,
            "users",
            "add",
            "bob",
            "--groups",
            "hr",
            "--password-stdin",
            stdin="another passphrase\n",
        )[0]
        == 0
    )
    assert run(capsys, monkeypatch, "users", "grant", "hr", "hr", "payroll")[0] == 0
    code, out, _ = run(capsys, monkeypatch, "users", "list", "--json")
    listed = json.loads(out)
    assert {u["username"]: u["role"] for u in listed["users"]} == {"alice": "admin", "bob": "staff"}
    assert listed["groups"]["hr"] == ["hr", "payroll"]
    assert not any("hash" in key for u in listed["users"] for key in u)

    code, out, err = run(
        capsys, monkeypatch, "users", "add", "carol", "--password-stdin", stdin="short\n"
    )
    assert code != 0
    assert "password" in err

    code, out, _ = run(capsys, monkeypatch, "audit", "--json")
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["data"]["action"] for r in records] == ["user_create", "user_create", "grants"]
    code, out, _ = run(capsys, monkeypatch, "audit", "verify")
    assert code == 0
    assert out.startswith("ok: 3 records")

    audit = load_settings().audit_path
    lines = audit.read_text().splitlines()
    lines[1] = lines[1].replace('"bob"', '"eve"')
    audit.write_text("\n".join(lines) + "\n")
    code, out, _ = run(capsys, monkeypatch, "audit", "verify")
    assert code != 0
    assert "TAMPERED" in out
    assert "line 2" in out
