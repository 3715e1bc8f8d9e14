"""``appliance doctor`` on a real data folder in tmp: healthy, then broken one way at a time."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest

from appliance.cli import EXIT_ERROR, main
from appliance.core.errors import ModelError
from appliance.core.settings import Settings, load_settings
from appliance.doctor import Check, render_dropin, run_checks


@pytest.fixture
def healthy(tmp_path: Path) -> Settings:
    data, docs = tmp_path / "data", tmp_path / "docs"
    data.mkdir(mode=0o750)
    docs.mkdir()
    os.chmod(data, 0o750)
    settings = load_settings(
        overrides={
            "data_dir": str(data),
            "ingest": {"docs_dir": str(docs)},
            # Port 0: the checks must not depend on what else runs on the test machine.
            "service": {"port": 0},
            "ui": {"port": 0},
            "metrics": {"port": 0},
        }
    )
    from appliance.core.audit import AuditLog
    from ingest.state import IngestState

    IngestState(settings.state_path).close()
    audit = AuditLog(settings.audit_path)
    audit.record("login", "alice", ok=True)
    audit.record("ask", "alice", question="how long are logs kept?")
    return settings


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def _units(tmp_path: Path) -> Path:
    return tmp_path / "units"  # absent: not a system install


def test_healthy_installation_passes(healthy: Settings, tmp_path: Path) -> None:
    checks = run_checks(healthy, unit_dir=_units(tmp_path))
    assert [c for c in checks if c.status == "fail"] == []
    found = _by_name(checks)
    for name in ("config", "data-dir", "documents", "disk", "embedding-model", "chat-model"):
        assert found[name].status == "ok", found[name]
    assert found["index"].status == "ok"
    assert "0 documents" in found["index"].detail
    assert found["audit-log"].detail.startswith("2 records")
    assert found["offline"].status == "ok"


def test_cli_json_and_exit_code(
    healthy: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["--data-dir", str(healthy.data_dir), "doctor", "--json"]
    monkeypatch.setenv("APPLIANCE_INGEST__DOCS_DIR", str(healthy.ingest.docs_dir))
    for key in ("SERVICE", "UI", "METRICS"):
        monkeypatch.setenv(f"APPLIANCE_{key}__PORT", "0")
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["fail"] == 0
    assert {"name", "status", "detail", "hint"} <= set(report["checks"][0])

    os.chmod(healthy.data_dir, 0o777)
    assert main(argv) == EXIT_ERROR
    report = json.loads(capsys.readouterr().out)
    failed = [c for c in report["checks"] if c["status"] == "fail"]
    assert [c["name"] for c in failed] == ["data-dir"]


def test_world_writable_data_dir_fails_with_a_fix(healthy: Settings, tmp_path: Path) -> None:
    os.chmod(healthy.data_dir, 0o777)
    check = _by_name(run_checks(healthy, unit_dir=_units(tmp_path)))["data-dir"]
    assert check.status == "fail"
    assert "world-writable" in check.detail
    assert f"chmod 0750 {healthy.data_dir}" in check.hint


def test_public_server_url_fails(healthy: Settings, tmp_path: Path) -> None:
    settings = healthy.model_copy(
        update={"store": healthy.store.model_copy(update={"url": "http://8.8.8.8:6333"})}
    )
    check = _by_name(run_checks(settings, unit_dir=_units(tmp_path)))["egress-store.url"]
    assert check.status == "fail"
    assert "public address 8.8.8.8" in check.detail
    assert "off-site" in check.hint


def test_private_server_needs_the_firewall_dropin(healthy: Settings, tmp_path: Path) -> None:
    """Under the installed units a LAN server is reachable only through allow.conf."""
    settings = healthy.model_copy(
        update={"chat": healthy.chat.model_copy(update={"url": "http://10.1.2.3:11434"})}
    )
    units = tmp_path / "units"
    units.mkdir()
    for name in ("appliance-core.service", "appliance-ui.service", "appliance-finetune@.service"):
        (units / name).write_text("[Service]\n")
    check = _by_name(run_checks(settings, unit_dir=units))["egress-chat.url"]
    assert check.status == "fail"
    assert "install.sh --system" in check.hint

    dropin = render_dropin(settings)
    assert "IPAddressAllow=10.1.2.3" in dropin.splitlines()
    for name in ("appliance-core.service", "appliance-finetune@.service"):
        (units / f"{name}.d").mkdir()
        (units / f"{name}.d" / "allow.conf").write_text(dropin)
    checks = _by_name(run_checks(settings, unit_dir=units))
    assert checks["egress-chat.url"].status == "ok"
    assert "firewall-appliance-core" not in checks
    assert checks["unit-appliance-core"].status in ("ok", "warn")


def test_tampered_audit_log_fails(healthy: Settings, tmp_path: Path) -> None:
    path = healthy.audit_path
    path.write_text(path.read_text().replace("alice", "mallory", 1))
    check = _by_name(run_checks(healthy, unit_dir=_units(tmp_path)))["audit-log"]
    assert check.status == "fail"
    assert "do not edit" in check.hint


def test_port_held_by_another_program_fails(healthy: Settings, tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        settings = healthy.model_copy(update={"ui": healthy.ui.model_copy(update={"port": port})})
        check = _by_name(run_checks(settings, unit_dir=_units(tmp_path)))["port-ui"]
    assert check.status == "fail"
    assert f"sport = :{port}" in check.hint


def _fake_registry(monkeypatch: pytest.MonkeyPatch, verified: object) -> None:
    """The registry module is another subsystem's; only its one call is faked here."""

    class ModelRegistry:
        def __init__(self, models_dir: Path) -> None:
            self.models_dir = models_dir

        def verified_gguf(self) -> object:
            if isinstance(verified, Exception):
                raise verified
            return verified

    module = types.ModuleType("finetune.registry")
    module.ModelRegistry = ModelRegistry  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "finetune.registry", module)


def test_tampered_gguf_in_the_registry_fails(
    healthy: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    healthy.models_dir.mkdir(parents=True)
    (healthy.models_dir / "registry.json").write_text('{"active": "v2"}')
    _fake_registry(monkeypatch, ModelError("v2.gguf: SHA-256 does not match the registry"))
    check = _by_name(run_checks(healthy, unit_dir=_units(tmp_path)))["model-registry"]
    assert check.status == "fail"
    assert "SHA-256" in check.detail
    assert "roll back" in check.hint

    _fake_registry(monkeypatch, healthy.models_dir / "v2.gguf")
    check = _by_name(run_checks(healthy, unit_dir=_units(tmp_path)))["model-registry"]
    assert check.status == "ok"


def test_registry_without_the_registry_module_warns(
    healthy: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    healthy.models_dir.mkdir(parents=True)
    (healthy.models_dir / "registry.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "finetune.registry", None)  # import fails
    check = _by_name(run_checks(healthy, unit_dir=_units(tmp_path)))["model-registry"]
    assert check.status == "warn"


def test_missing_chat_model_fails(healthy: Settings, tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf")
    settings = healthy.model_copy(
        update={"chat": healthy.chat.model_copy(update={"model_path": bogus})}
    )
    check = _by_name(run_checks(settings, unit_dir=_units(tmp_path)))["chat-model"]
    assert check.status == "fail"
    assert "chat.model_path" in check.hint


def test_module_entry_reports_a_broken_config(tmp_path: Path) -> None:
    """`appliance` itself stops at a bad config; `python -m appliance.doctor` reports it."""
    config = tmp_path / "config.yaml"
    config.write_text("ingest: {debounce_s: -3}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    run = subprocess.run(
        [sys.executable, "-m", "appliance.doctor", "--config", str(config)],
        capture_output=True, text=True, check=False, env=env, timeout=60,
    )  # fmt: skip
    assert run.returncode == EXIT_ERROR
    assert run.stdout.startswith("FAIL  config")
    assert "debounce_s" in run.stdout


def test_ocr_check_names_tesseract_and_the_language_packs() -> None:
    import shutil as sh

    from appliance.core.settings import load_settings
    from appliance.doctor import check_ocr

    assert check_ocr(load_settings(env={"APPLIANCE_OCR__ENGINE": "off"})).status == "ok"
    check = check_ocr(load_settings(env={"APPLIANCE_OCR__LANGUAGES": "eng+zzz"}))
    assert check.status == "warn"
    assert "tesseract-ocr-zzz" in check.hint
    if sh.which("tesseract") is not None:
        assert check_ocr(load_settings(env={})).status == "ok"
