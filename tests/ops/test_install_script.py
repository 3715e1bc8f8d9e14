"""``install.sh --system`` for real, into a temporary root.

The real path downloads torch and the models into /opt/appliance; here ``INSTALL_REUSE_VENV``
points the new venv at this checkout's venv for its dependencies, while the appliance itself is
built from the checkout and installed non-editable exactly as on an appliance. Users and
``systemctl`` are skipped (``INSTALL_SKIP_USERS``, ``INSTALL_SKIP_SYSTEMCTL``): the container
running the tests has no systemd as PID 1.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "install.sh"


def _run(
    args: list[str], env: dict[str, str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(
        [str(INSTALL), *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if check:
        assert run.returncode == 0, run.stdout + run.stderr
    return run


@pytest.fixture
def sysroot(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "root"
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(
        INSTALL_PREFIX=str(root / "opt/appliance"),
        INSTALL_ETC=str(root / "etc/appliance"),
        INSTALL_DATA=str(root / "var/lib/appliance"),
        INSTALL_DOCS=str(root / "srv/appliance/documents"),
        INSTALL_UNIT_DIR=str(root / "etc/systemd/system"),
        INSTALL_POLKIT_DIR=str(root / "etc/polkit-1/rules.d"),
        INSTALL_SKIP_USERS="1",
        INSTALL_SKIP_SYSTEMCTL="1",
        INSTALL_REUSE_VENV=sys.prefix,
        PYTHON=shutil.which("python3") or sys.executable,
    )
    return root, env


def test_options_are_checked() -> None:
    env = dict(os.environ)
    assert _run(["--bogus"], env, check=False).returncode == 2
    assert _run(["--purge"], env, check=False).returncode == 2
    assert "--system" in _run(["--help"], env).stdout


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.slow
@pytest.mark.integration
def test_system_install_upgrade_uninstall(sysroot: tuple[Path, dict[str, str]]) -> None:
    root, env = sysroot
    (root / "etc/polkit-1/rules.d").mkdir(parents=True)
    first = _run(["--system"], env)
    assert "NOT enabled or started" in first.stderr  # says so clearly without systemd

    prefix, etc = root / "opt/appliance", root / "etc/appliance"
    data, docs, units = (
        root / "var/lib/appliance",
        root / "srv/appliance/documents",
        root / "etc/systemd/system",
    )
    appliance = prefix / ".venv/bin/appliance"
    located = subprocess.run(
        [str(prefix / ".venv/bin/python"), "-c", "import appliance; print(appliance.__file__)"],
        capture_output=True, text=True, check=True, env=env, cwd=root,
    ).stdout  # fmt: skip
    assert located.startswith(str(prefix)), "the appliance must be installed non-editable"
    assert _mode(data) == 0o750
    assert _mode(etc / "config.yaml") == 0o640
    assert _mode(docs) == 0o2770  # setgid, group (appliance-admins) writable, no others
    config = (etc / "config.yaml").read_text()
    assert f"data_dir: {data}" in config
    assert f"docs_dir: {docs}" in config
    # The audit key: outside the data folder, not readable by others, used by the config.
    assert _mode(etc / "audit.key") == 0o640
    assert len((etc / "audit.key").read_bytes().strip()) >= 32
    assert f"hmac_key_file: {etc}/audit.key" in config
    core = (units / "appliance-core.service").read_text()
    assert f"ExecStart={appliance} serve" in core
    assert f"ReadWritePaths={data} {docs}" in core
    assert "=/opt/appliance" not in core
    assert "/etc/appliance/config.yaml" not in core.replace(str(etc), "")
    assert (units / "appliance-core.service.d/allow.conf").is_file()
    assert (root / "etc/polkit-1/rules.d/50-appliance-finetune.rules").is_file()
    if shutil.which("systemd-analyze"):
        names = [f"./{p.name}" for p in sorted(units.glob("*.service"))]
        verify = subprocess.run(
            ["systemd-analyze", "verify", *names], cwd=units, capture_output=True, text=True,
            check=False,
        )  # fmt: skip
        assert verify.returncode == 0, verify.stderr
        assert not verify.stderr.strip(), verify.stderr

    # The installed doctor passes on the fresh installation.
    doctor_env = {k: v for k, v in env.items() if not k.startswith("INSTALL_")}
    doctor = subprocess.run(
        [str(appliance), "--config", str(etc / "config.yaml"), "doctor", "--json",
         "--unit-dir", str(units)],
        capture_output=True, text=True, check=False, env=doctor_env, cwd=root,
    )  # fmt: skip
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr

    # An upgrade keeps the config (edited by the admin) and the data, and regenerates the
    # firewall drop-in from the configured servers.
    (etc / "config.yaml").write_text(
        config + "store: {mode: server, url: 'http://10.20.30.40:6333'}\n"
    )
    (data / "keep.txt").write_text("index")
    (docs / "report.md").write_text("# a document")
    second = _run(["--system"], env)
    assert "kept" in second.stdout
    assert "10.20.30.40" in (etc / "config.yaml").read_text()
    assert (data / "keep.txt").read_text() == "index"
    assert (docs / "report.md").is_file()
    for unit in ("appliance-core.service", "appliance-finetune@.service"):
        allow = (units / f"{unit}.d/allow.conf").read_text()
        assert "IPAddressAllow=10.20.30.40" in allow.splitlines()

    _run(["--uninstall"], env)
    assert not prefix.exists()
    assert not (units / "appliance-core.service").exists()
    assert not (units / "appliance-core.service.d").exists()
    assert (etc / "config.yaml").is_file()
    assert (data / "keep.txt").is_file()
    assert (docs / "report.md").is_file()

    _run(["--uninstall", "--purge"], env)
    assert not data.exists()
    assert not etc.exists()
    assert not docs.exists()
