"""The system install under a real systemd: boot a Debian container, install, check, uninstall.

``install.sh --system`` runs inside a container booted by ``systemd-nspawn`` with systemd 252 as
PID 1, and a oneshot probe unit (tests/ops/systemd_probe.py) checks what only a real systemd
shows: ``Type=notify`` readiness, the restart after ``kill -9``, the watchdog restart of a hung
service, the UI's health, ``appliance doctor``'s readiness checks, a dropped document becoming
searchable, a fine-tuning run started by the service user through the polkit rule, the live
``systemd-analyze security`` scores, the sandbox as applied, the firewall and its generated
drop-in (through an upgrade re-install), the journal free of secrets, and the uninstall. Each
check is pass, fail, or n/a with the reason (an option this container cannot apply); the test
fails on any fail.

Nothing is downloaded twice and nothing reaches a network from inside: this test session's own
venv (``sys.prefix``) is bind-mounted read-only at /opt/reuse-venv and install.sh reuses it
(``INSTALL_REUSE_VENV``); the container has a loopback interface only (``--private-network``).
(Not at its own path: a checkout under /root or /tmp would be hidden from the services by
``ProtectHome=`` and ``PrivateTmp=``.) The rootfs is built once by debootstrap into a cache
folder (tests/ops/systemd_container.py) and each boot runs on a throwaway copy.

Needs root, systemd-nspawn and debootstrap (installed with apt when missing) and Debian's mirror
for the first build; otherwise it skips, saying which. Figures: docs/operations.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from tests.ops import systemd_container as container

pytestmark = [pytest.mark.systemd, pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("systemd_probe.py")
BOOT_TIMEOUT_S = 1200
EXPECTED = (
    "systemd as PID 1",
    "install --system, enable --now",
    "appliance-ui answers /_stcore/health",
    "appliance doctor under systemd",
    "dropped document is searchable (appliance search)",
    "appliance-core active only after READY=1",
    "kill -9 of the core's main pid: restarted",
    "hung core (SIGSTOP): killed and restarted by the watchdog",
    "sandbox in effect on the running core",
    "IPAddressDeny=any and the generated allow drop-in",
    "TasksMax (cgroup pids controller)",
    "systemd-analyze security (live units)",
    "appliance-finetune@RUN runs a 2-step job as the service user",
    "polkit rule: the service user may start fine-tuning units, nothing else",
    "the journal holds no password or token",
    "options systemd could not apply (journal)",
    "install.sh --uninstall removes the units, keeps the data",
)

PROBE_UNIT = """\
[Unit]
Description=The boot test's probe: install the appliance, check it under systemd, power off
After=multi-user.target dbus.service
Wants=dbus.service

[Service]
Type=oneshot
Environment=PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
ExecStart=/usr/bin/python3 /usr/local/lib/appliance-probe/probe.py
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity
"""


def _requirements() -> None:
    if sys.platform != "linux":
        pytest.skip("needs Linux (systemd-nspawn)")
    if os.geteuid() != 0:
        pytest.skip("needs root: systemd-nspawn boots the container and debootstrap builds it")
    if sys.version_info[:2] != (3, 11):
        pytest.skip("the venv is reused inside a Debian 12 container, whose Python is 3.11")
    if sys.prefix == sys.base_prefix:
        pytest.skip("run from the project's venv (./install.sh --dev): it is reused inside")


def _table(rows: list[dict[str, str]]) -> str:
    width = max(len(r["check"]) for r in rows)
    return "\n".join(f"{r['status']:4s}  {r['check']:{width}s}  {r['detail']}" for r in rows)


@pytest.fixture(scope="module")
def rootfs() -> Path:
    _requirements()
    try:
        container.ensure_host_tools()
        return container.build_rootfs()
    except (container.Unavailable, OSError) as exc:
        pytest.skip(f"no container here: {exc}")


def test_system_install_under_systemd(rootfs: Path, tmp_path: Path) -> None:
    scratch = container.scratch_copy(rootfs, tmp_path / "rootfs")
    out = tmp_path / "out"
    out.mkdir()
    probe_dir = scratch / "usr/local/lib/appliance-probe"
    probe_dir.mkdir(parents=True)
    shutil.copy(PROBE, probe_dir / "probe.py")
    units = scratch / "etc/systemd/system"
    # PROBE_ONLY=ui,search,... runs only those checks (and the install and uninstall): for
    # working on one check without waiting for the others.
    only = os.environ.get("PROBE_ONLY", "")
    (units / "appliance-probe.service").write_text(
        PROBE_UNIT + (f"Environment=PROBE_ONLY={only}\n" if only else "")
    )
    wants = units / "multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / "appliance-probe.service").symlink_to("/etc/systemd/system/appliance-probe.service")

    t0 = time.monotonic()
    try:
        booted = container.boot(
            scratch,
            bind_ro=[(ROOT, "/src"), (Path(sys.prefix), "/opt/reuse-venv")],
            bind=[(out, "/probe-out")],
            timeout=BOOT_TIMEOUT_S,
        )
    finally:
        container.remove(scratch)  # a few hundred MB; the results are in out/
    took = time.monotonic() - t0
    results = out / "results.json"
    rows = json.loads(results.read_text()) if results.is_file() else []
    table = _table(rows) if rows else "(no results)"
    # The table is the test's report: printed (pytest -s, or -rA) and kept beside the run.
    report = f"boot, install, checks, poweroff: {took:.0f} s\n{table}\n"
    (tmp_path / "report.txt").write_text(report)
    print("\n" + report)
    # Where the container stopped early, the console and the journal say why.
    context = "" if rows and (out / "done").exists() else booted.console[-3000:]
    assert not booted.timed_out, f"the container ran past {BOOT_TIMEOUT_S} s\n{table}\n{context}"
    assert (out / "done").exists(), f"the probe did not finish\n{table}\n{context}"
    failed = [r for r in rows if r["status"] == "fail"]
    assert not failed, f"{len(failed)} checks failed:\n{table}"
    missing = [name for name in EXPECTED if name not in {r["check"] for r in rows}]
    if os.environ.get("PROBE_ONLY"):
        pytest.skip(f"PROBE_ONLY ran a subset; no failures:\n{table}")
    assert not missing, f"checks that did not run: {missing}\n{table}"
