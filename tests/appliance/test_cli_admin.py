"""`appliance users` and `appliance audit`: the first admin, grants, and a tamper check."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.core.settings import load_settings


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


def test_audit_anchor_catches_a_cut_tail_and_listing_is_inert(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    hermetic_env: Path,
    tmp_path: Path,
) -> None:
    from appliance.core.audit import open_audit_log

    settings = load_settings()
    with open_audit_log(settings) as audit:
        for n in range(5):
            audit.record("login", "alice", n=n)
        # A failed sign-in's raw username goes in data, where it may hold anything.
        audit.record("login_failed", None, attempt="x\n2026-01-01  admin  login  {}\x1b[2K")
    code, out, _ = run(capsys, monkeypatch, "audit", "anchor", "--json")
    assert code == 0
    anchor = json.loads(out)
    assert anchor["count"] == 6
    anchor_file = tmp_path / "anchor.json"
    anchor_file.write_text(out)

    code, out, _ = run(capsys, monkeypatch, "audit")
    assert len(out.splitlines()) == 6  # the newline in the attempt forged no line
    assert "\x1b" not in out
    assert "\\n2026" in out

    code, out, _ = run(capsys, monkeypatch, "audit", "verify", "--anchor", str(anchor_file))
    assert code == 0, out
    lines = settings.audit_path.read_text().splitlines(keepends=True)
    settings.audit_path.write_text("".join(lines[:3]))
    code, out, _ = run(capsys, monkeypatch, "audit", "verify")
    assert code == 0  # a cut tail still chains
    code, out, _ = run(capsys, monkeypatch, "audit", "verify", "--anchor", str(anchor_file))
    assert code != 0
    assert "TAMPERED" in out
    code, out, _ = run(capsys, monkeypatch, "audit", "verify", "--anchor", anchor["last_hash"])
    assert code != 0


def test_keyed_audit_through_the_settings(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    hermetic_env: Path,
    tmp_path: Path,
) -> None:
    key = tmp_path / "etc" / "audit.key"
    key.parent.mkdir()
    key.write_bytes(b"0123456789abcdef" * 3)
    monkeypatch.setenv("APPLIANCE_AUDIT__HMAC_KEY_FILE", str(key))
    code, _, err = run(
        capsys, monkeypatch, "users", "add", "alice", "--password-stdin", stdin="a passphrase 1\n"
    )
    assert code == 0, err
    record = json.loads(load_settings().audit_path.read_text().splitlines()[0])
    assert len(record["mac"]) == 64
    code, out, _ = run(capsys, monkeypatch, "audit", "verify", "--json")
    assert code == 0
    assert json.loads(out)["keyed_from"] == 1
    key.write_bytes(b"another key of enough length......")
    code, out, _ = run(capsys, monkeypatch, "audit", "verify")
    assert code != 0
