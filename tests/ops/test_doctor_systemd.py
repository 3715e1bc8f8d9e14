"""``appliance doctor`` under systemd (readiness, watchdog, restarts), the SBOM it reports, and
the two faults the boot test found (tests/ops/test_systemd_boot.py): a UI that may write nowhere,
and a first-admin password that must not reach the journal.

The readiness checks read ``systemctl show``; here its answers are given as dicts (the seam),
with the properties systemd 252 reported for the real units in the boot test.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from appliance import cli
from appliance.core.settings import Settings
from appliance.doctor import Check, check_readiness, check_sbom

CORE_READY = {
    "LoadState": "loaded",
    "ActiveState": "active",
    "SubState": "running",
    "Type": "notify",
    "StatusText": "watching /srv/appliance/documents; API on 127.0.0.1:8765",
    "WatchdogUSec": "2min",
    "NRestarts": "0",
    "Result": "success",
}
UI_RUNNING = {"ActiveState": "active", "SubState": "running", "Type": "simple", "NRestarts": "0"}


def _readiness(
    settings: Settings,
    core: Mapping[str, str] = CORE_READY,
    ui: Mapping[str, str] = UI_RUNNING,
    ui_alive: bool = True,
) -> dict[str, Check]:
    units = {"appliance-core.service": core, "appliance-ui.service": ui}
    checks = check_readiness(settings, show=units.__getitem__, ui_alive=lambda: ui_alive)
    return {c.name: c for c in checks}


def test_ready_units_pass(settings: Settings) -> None:
    checks = _readiness(settings)
    assert {c.status for c in checks.values()} == {"ok"}
    assert "READY=1" in checks["ready-core"].detail
    assert "120 s" in checks["watchdog-core"].detail
    assert "restarts-appliance-core" not in checks


def test_core_still_starting_or_failed_fails(settings: Settings) -> None:
    for state in ("activating", "failed"):
        check = _readiness(settings, core={**CORE_READY, "ActiveState": state})["ready-core"]
        assert check.status == "fail"
        assert "journalctl -u appliance-core.service" in check.hint


def test_unhealthy_status_fails_and_no_watchdog_warns(settings: Settings) -> None:
    core = {**CORE_READY, "StatusText": "unhealthy: the local API does not answer"}
    assert _readiness(settings, core=core)["ready-core"].status == "fail"
    for off in ("infinity", "0", ""):
        checks = _readiness(settings, core={**CORE_READY, "WatchdogUSec": off})
        assert checks["watchdog-core"].status == "warn"
    checks = _readiness(settings, core={**CORE_READY, "WatchdogUSec": "1min 30s"})
    assert "90 s" in checks["watchdog-core"].detail


def test_not_notify_type_warns(settings: Settings) -> None:
    check = _readiness(settings, core={**CORE_READY, "Type": "simple"})["ready-core"]
    assert check.status == "warn"
    assert "READY=1" in check.detail


def test_restarts_warn(settings: Settings) -> None:
    checks = _readiness(settings, core={**CORE_READY, "NRestarts": "3"})
    assert checks["restarts-appliance-core"].status == "warn"
    assert "3 times" in checks["restarts-appliance-core"].detail


def test_ui_down_or_not_answering_fails(settings: Settings) -> None:
    assert _readiness(settings, ui={**UI_RUNNING, "ActiveState": "failed"})["ready-ui"].status == (
        "fail"
    )
    check = _readiness(settings, ui_alive=False)["ready-ui"]
    assert check.status == "fail"
    assert "/_stcore/health" in check.detail


def test_sbom_path_is_reported(tmp_path: Path) -> None:
    assert check_sbom(tmp_path).status == "warn"
    (tmp_path / "sbom.cdx.json").write_text(
        json.dumps({"bomFormat": "CycloneDX", "components": [{"name": "a"}, {"name": "b"}]})
    )
    check = check_sbom(tmp_path)
    assert check.status == "ok"
    assert str(tmp_path / "sbom.cdx.json") in check.detail
    assert "2 components" in check.detail


def test_log_file_that_cannot_be_written_falls_back_to_stderr(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """The UI unit has no writable path (ProtectSystem=strict): it crashed opening its log."""
    settings.data_dir.mkdir(parents=True)
    os.chmod(settings.data_dir, 0o500)
    if os.access(settings.data_dir, os.W_OK):  # root ignores the mode: use a file as the folder
        os.chmod(settings.data_dir, 0o700)
        settings.log_dir.write_text("not a folder")
    try:
        cli._setup_logging(settings, verbose=False, to_file=True)
    finally:
        os.chmod(settings.data_dir, 0o700)
        logging.basicConfig(force=True, handlers=[logging.StreamHandler(sys.stderr)])
    assert "stderr only" in capsys.readouterr().err
