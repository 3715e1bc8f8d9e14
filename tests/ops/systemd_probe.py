"""The boot test's probe: runs inside the container as a oneshot unit (root), after boot.

Stdlib only (it runs on the container's own Python). It installs the appliance with
``install.sh --system`` (reusing the host's venv, bind-mounted read-only at /opt/reuse-venv),
then checks the services under the real systemd, one row per check: ``pass``, ``fail`` or
``n/a`` (not applicable in this container), each with why. The rows go to
``/probe-out/results.json`` (a folder the host bind-mounts writable) and, as lines, to the
console; then it powers off.

Timings are bounded: each wait has its own deadline, and the host kills the container when the
whole boot outlasts its timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

OUT = Path("/probe-out")
SRC = Path("/src")
REUSE_VENV = "/opt/reuse-venv"
PREFIX = Path("/opt/appliance")
APPLIANCE = PREFIX / ".venv/bin/appliance"
CONFIG = "/etc/appliance/config.yaml"
DATA = Path("/var/lib/appliance")
DOCS = Path("/srv/appliance/documents")
CORE, UI, FINETUNE = "appliance-core.service", "appliance-ui.service", "appliance-finetune@"
# The unit's WatchdogSec=120 would make the hung-service check take minutes: a runtime drop-in
# (in /run, so it is not part of what install.sh manages) shortens it for this boot only.
WATCHDOG_S = 10
RESTART_S = 5  # the unit's RestartSec
FINETUNE_BUDGET_S = int(os.environ.get("PROBE_FINETUNE_BUDGET_S", "420"))
SECRET_MARKER = "probe-secret-Zq8w"  # a password the probe sets; must never reach the journal

rows: list[dict[str, str]] = []
started = time.monotonic()


def row(check: str, status: str, detail: str) -> None:
    rows.append({"check": check, "status": status, "detail": detail})
    elapsed = time.monotonic() - started
    print(f"PROBE {elapsed:6.1f}s {status:4s} {check}: {detail}", flush=True)
    (OUT / "results.json").write_text(json.dumps(rows, indent=1))


def sh(
    *args: str, timeout: float = 120, check: bool = False, **kw: object
) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kw,  # type: ignore[arg-type]
    )
    if check and run.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {run.returncode}: {run.stderr.strip()[-400:]}")
    return run


def as_service_user(
    *args: str, timeout: float = 120, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = [
        f"APPLIANCE_CONFIG={CONFIG}",
        "HF_HUB_OFFLINE=1",
        "TRANSFORMERS_OFFLINE=1",
        "HOME=/tmp",
        "PATH=/usr/bin:/bin",
    ]
    return subprocess.run(
        ["runuser", "-u", "appliance", "--", "env", "-i", *env, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        input=stdin,
        cwd="/tmp",
    )


def show(unit: str, *props: str) -> dict[str, str]:
    run = sh("systemctl", "show", unit, *(f"--property={p}" for p in props))
    return dict(line.split("=", 1) for line in run.stdout.splitlines() if "=" in line)


def wait_for(predicate: Callable[[], bool], timeout: float, poll: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


def http_ok(url: str, timeout: float = 3) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def core_healthy() -> bool:
    return http_ok("http://127.0.0.1:8765/health")


def active(unit: str) -> bool:
    return show(unit, "ActiveState")["ActiveState"] == "active"


def restart_clean(unit: str) -> None:
    """Reset the start-rate counter, so the checks' own restarts never hit StartLimitBurst."""
    sh("systemctl", "reset-failed", unit)


@contextlib.contextmanager
def check(name: str) -> Iterator[None]:
    """A check that raises is a ``fail`` with the error, never a dead probe."""
    try:
        yield
    except Exception as exc:  # the table must be complete whatever breaks
        row(name, "fail", f"{type(exc).__name__}: {exc}")


# --- the checks ---------------------------------------------------------------------------------


def install() -> bool:
    dropin = Path(f"/run/systemd/system/{CORE}.d")
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "probe-watchdog.conf").write_text(f"[Service]\nWatchdogSec={WATCHDOG_S}\n")
    sh("systemctl", "daemon-reload")
    env = dict(os.environ, INSTALL_REUSE_VENV=REUSE_VENV, PYTHON="/usr/bin/python3")
    t0 = time.monotonic()
    run = sh("bash", str(SRC / "install.sh"), "--system", timeout=600, env=env)
    took = time.monotonic() - t0
    (OUT / "install.log").write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        row("install --system", "fail", f"exit {run.returncode}: {run.stderr.strip()[-300:]}")
        return False
    states = {u: show(u, "ActiveState", "UnitFileState") for u in (CORE, UI)}
    ok = all(s == {"ActiveState": "active", "UnitFileState": "enabled"} for s in states.values())
    row(
        "install --system, enable --now",
        "pass" if ok else "fail",
        f"{took:.0f} s; "
        + "; ".join(f"{u}: {s['UnitFileState']}, {s['ActiveState']}" for u, s in states.items()),
    )
    return ok


def ui_health() -> None:
    ok = wait_for(lambda: http_ok("http://127.0.0.1:8501/_stcore/health"), 90)
    row(
        "appliance-ui answers /_stcore/health",
        "pass" if ok else "fail",
        "ok" if ok else f"no answer in 90 s ({show(UI, 'ActiveState', 'SubState')})",
    )


def doctor() -> None:
    """`appliance doctor` run by the service user reads the same readiness from systemd."""
    run = as_service_user(str(APPLIANCE), "doctor", "--json", timeout=180)
    try:
        checks = {c["name"]: c for c in json.loads(run.stdout)["checks"]}
    except (ValueError, KeyError) as exc:
        raise RuntimeError(f"doctor printed no JSON ({exc}): {run.stderr.strip()[-300:]}") from exc
    wanted = ("ready-core", "watchdog-core", "ready-ui", "sbom")
    seen = {name: checks.get(name, {}).get("status", "missing") for name in wanted}
    failed = sorted(n for n, c in checks.items() if c["status"] == "fail")
    ok = all(status == "ok" for status in seen.values())
    row(
        "appliance doctor under systemd",
        "pass" if ok else "fail",
        ", ".join(f"{n}: {s}" for n, s in seen.items())
        + f"; sbom: {checks.get('sbom', {}).get('detail', '?')}"
        + (f"; other failures: {', '.join(failed)}" if failed else ""),
    )


def document_search() -> None:
    phrase = "zebra calibration protocol ZX-41"
    note = DOCS / "probe-note.md"
    note.write_text(
        "# Sensor maintenance\n\nThe zebra calibration protocol ZX-41 requires every sensor to "
        "be recalibrated each quarter by the facilities team.\n"
    )
    shutil.chown(note, group="appliance-admins")
    note.chmod(0o660)
    t0 = time.monotonic()
    found = ""

    def searchable() -> bool:
        nonlocal found
        run = as_service_user(str(APPLIANCE), "search", phrase, "--json", "-k", "3")
        found = (run.stdout + run.stderr)[-300:]
        return run.returncode == 0 and "probe-note.md" in run.stdout

    ok = wait_for(searchable, 120, poll=3)
    row(
        "dropped document is searchable (appliance search)",
        "pass" if ok else "fail",
        f"found by the watcher and searchable after {time.monotonic() - t0:.0f} s"
        if ok
        else f"not found in 120 s: {found}",
    )


def readiness() -> None:
    """Active only after READY=1: while the API does not answer yet, systemd must say
    ``activating``; once it says ``active``, the API must answer (READY=1 comes after it does)."""
    sh("systemctl", "stop", CORE, timeout=180)
    restart_clean(CORE)
    sh("systemctl", "start", "--no-block", CORE)
    t0 = time.monotonic()
    waited = early = 0
    state = ""
    while time.monotonic() - t0 < 180:
        state = show(CORE, "ActiveState")["ActiveState"]
        if state == "active":
            early += not core_healthy()  # active but not answering: not what READY=1 promises
            break
        if state == "activating" and not core_healthy():
            waited += 1
        if state == "failed":
            break
        time.sleep(0.2)
    took = time.monotonic() - t0
    props = show(CORE, "Type", "StatusText", "WatchdogUSec", "NotifyAccess")
    ok = state == "active" and waited > 0 and early == 0 and props["Type"] == "notify"
    row(
        "appliance-core active only after READY=1",
        "pass" if ok else "fail",
        f"Type={props['Type']}: 'activating' with the API down for {waited} polls, then "
        f"'active' with the API answering after {took:.1f} s; StatusText={props['StatusText']!r}"
        if ok
        else f"state {state}, activating-polls {waited}, active-before-API {early}",
    )
    # The UI was stopped with the core (PartOf=): bring it back for the later checks.
    sh("systemctl", "start", UI, timeout=180)


def _wait_new_main_pid(old: int, timeout: float) -> tuple[int, float]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        pid = int(show(CORE, "MainPID")["MainPID"])
        if pid not in (0, old):
            return pid, time.monotonic() - t0
        time.sleep(0.1)
    return 0, timeout


def kill9() -> None:
    restart_clean(CORE)
    before = show(CORE, "MainPID", "NRestarts")
    pid = int(before["MainPID"])
    os.kill(pid, signal.SIGKILL)
    new, after = _wait_new_main_pid(pid, RESTART_S + 30)
    back = wait_for(lambda: active(CORE) and core_healthy(), 180)
    restarts = int(show(CORE, "NRestarts")["NRestarts"]) - int(before["NRestarts"])
    ok = bool(new) and after <= RESTART_S + 3 and back and restarts == 1
    row(
        "kill -9 of the core's main pid: restarted",
        "pass" if ok else "fail",
        f"new main process {after:.1f} s after the kill (RestartSec={RESTART_S}), active and "
        f"answering again; NRestarts +{restarts}",
    )


def watchdog() -> None:
    restart_clean(CORE)
    before = show(CORE, "MainPID", "NRestarts")
    pid = int(before["MainPID"])
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    os.kill(pid, signal.SIGSTOP)
    new, after = _wait_new_main_pid(pid, WATCHDOG_S + RESTART_S + 60)
    back = wait_for(lambda: active(CORE) and core_healthy(), 180)
    journal = sh("journalctl", "-u", CORE, "--since", since, "-o", "cat").stdout
    timeout_logged = "Watchdog timeout" in journal
    ok = bool(new) and back and timeout_logged
    row(
        "hung core (SIGSTOP): killed and restarted by the watchdog",
        "pass" if ok else "fail",
        f"WatchdogSec={WATCHDOG_S} (probe drop-in; the unit says 120): new main process "
        f"{after:.1f} s after SIGSTOP, journal: "
        + ("'Watchdog timeout'" if timeout_logged else "no watchdog message")
        + ("" if back else "; not active again"),
    )


def sandbox() -> None:
    """What the hardening options do to the running core, read from /proc."""
    pid = show(CORE, "MainPID")["MainPID"]
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    mounts = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        parts = line.split()
        mounts[parts[4]] = parts[5]
    uid_map = Path(f"/proc/{pid}/uid_map").read_text().split()
    found = {
        "NoNewPrivs": fields.get("NoNewPrivs", "").strip() == "1",
        "Seccomp filter": fields.get("Seccomp", "").strip() == "2",
        "no capabilities": int(fields.get("CapEff", "1").strip(), 16) == 0
        and int(fields.get("CapBnd", "1").strip(), 16) == 0,
        "/ read-only": mounts.get("/", "").startswith("ro"),
        "data folder writable": mounts.get(str(DATA), "").startswith("rw"),
        "PrivateUsers (own uid map)": uid_map[:3] != ["0", "0", "4294967295"],
        "PrivateTmp": "/tmp" in mounts,
    }
    missing = [k for k, v in found.items() if not v]
    row(
        "sandbox in effect on the running core",
        "pass" if not missing else "fail",
        ", ".join(found) if not missing else "missing: " + ", ".join(missing),
    )


BLOCKED_IP, SERVER_IP = "10.213.0.1", "10.213.0.2"  # on lo: non-loopback, yet local


def _connect_as(unit: str, ip: str, port: int) -> str:
    """Connect to ip:port from a transient service with ``unit``'s IP firewall settings as
    they are in force now (unit file, generated drop-in and all): "connected" or "refused ..."."""
    props = show(unit, "IPAddressDeny", "IPAddressAllow")
    code = (
        "import socket\n"
        f"try: socket.create_connection(('{ip}', {port}), timeout=3).close()\n"
        "except OSError as e: print('refused', e)\n"
        "else: print('connected')\n"
    )
    args = [f"--property=IPAddressDeny={props['IPAddressDeny']}"]
    args += [f"--property=IPAddressAllow={a}" for a in props["IPAddressAllow"].split()]
    run = sh("systemd-run", "--quiet", "--wait", "--pipe", *args, "/usr/bin/python3", "-c", code)
    return run.stdout.strip() or run.stderr.strip()


def firewall() -> None:
    """IPAddressDeny=any, then the drop-in that install.sh writes for a configured server on
    the LAN: set ``finetune.ollama_url`` to one, re-run install.sh --system (the upgrade path),
    and that address, only that one, gets through."""
    name = "IPAddressDeny=any and the generated allow drop-in"
    for ip in (BLOCKED_IP, SERVER_IP):
        sh("ip", "addr", "add", f"{ip}/32", "dev", "lo")
    with socket.socket() as blocked, socket.socket() as server:
        blocked.bind((BLOCKED_IP, 0))
        server.bind((SERVER_IP, 0))
        blocked.listen(8)
        server.listen(8)
        ports = blocked.getsockname()[1], server.getsockname()[1]
        before = _connect_as(CORE, BLOCKED_IP, ports[0])
        if not before.startswith("refused"):
            row(
                name,
                "n/a",
                f"not enforced in this container (a connect to {BLOCKED_IP} under the core's "
                f"IPAddressDeny=any: {before}): systemd's IP firewall needs cgroup v2 and the "
                "bpf() system call; the in-process offline guard still refuses it",
            )
            return
        config = Path(CONFIG)
        text = config.read_text()
        config.write_text(text + f"finetune: {{ollama_url: 'http://{SERVER_IP}:{ports[1]}'}}\n")
        env = dict(os.environ, INSTALL_REUSE_VENV=REUSE_VENV, PYTHON="/usr/bin/python3")
        upgrade = sh("bash", str(SRC / "install.sh"), "--system", timeout=600, env=env)
        (OUT / "upgrade.log").write_text(upgrade.stdout + upgrade.stderr)
        allowed = show(CORE, "IPAddressAllow")["IPAddressAllow"]
        to_server = _connect_as(CORE, SERVER_IP, ports[1])
        elsewhere = _connect_as(CORE, BLOCKED_IP, ports[0])
    config.write_text(text)
    ok = (
        upgrade.returncode == 0
        and SERVER_IP in allowed
        and to_server == "connected"
        and elsewhere.startswith("refused")
        and active(CORE)
    )
    row(
        name,
        "pass" if ok else "fail",
        f"before: {BLOCKED_IP} {before}; after setting finetune.ollama_url to {SERVER_IP} and "
        f"re-running install.sh --system (exit {upgrade.returncode}): IPAddressAllow={allowed}, "
        f"{SERVER_IP} {to_server}, {BLOCKED_IP} {elsewhere}",
    )


def resource_limits() -> None:
    """TasksMax and friends need cgroup controllers, which the host may not delegate."""
    cgroup = Path("/sys/fs/cgroup/system.slice") / CORE
    pids_max = cgroup / "pids.max"
    controllers = Path("/sys/fs/cgroup/cgroup.controllers")
    listed = controllers.read_text().split() if controllers.is_file() else []
    if pids_max.is_file():
        value = pids_max.read_text().strip()
        row("TasksMax (cgroup pids controller)", "pass" if value == "512" else "fail",
            f"{pids_max}: {value}")  # fmt: skip
        return
    row(
        "TasksMax (cgroup pids controller)",
        "n/a",
        f"not enforced in this container: no pids controller in its cgroup (controllers: "
        f"{' '.join(listed) or 'none'}); on this cgroup v1 host they stay with the host's v1 "
        "hierarchies. The same holds for CPUWeight (fine-tuning) and a MemoryMax drop-in.",
    )


def ignored_options() -> None:
    """Options systemd could not apply here, as it says in the journal."""
    journal = sh("journalctl", "-b", "-o", "short-monotonic").stdout
    keys = ("not supported", "ignoring", "Ignoring", "unsupported", "Failed to set up")
    lines = sorted(
        {
            re.sub(r"^\[[^\]]*\]\s+\S+\s+", "", ln)
            for ln in journal.splitlines()
            if "appliance" in ln and any(k in ln for k in keys)
        }
    )
    (OUT / "ignored-options.txt").write_text("\n".join(lines) + "\n")
    row(
        "options systemd could not apply (journal)",
        "pass" if not lines else "n/a",
        "none reported" if not lines else f"{len(lines)} messages: " + " | ".join(lines[:4]),
    )


def security_scores() -> None:
    scores = []
    for unit in (CORE, UI, f"{FINETUNE}probe.service"):
        run = sh("systemd-analyze", "security", "--no-pager", unit, timeout=60)
        match = re.search(r"Overall exposure level for \S+: ([\d.]+) (\S+)", run.stdout)
        scores.append(f"{unit}: {match.group(1)} {match.group(2)}" if match else f"{unit}: ?")
    levels = [float(m) for m in re.findall(r": ([\d.]+) ", "; ".join(scores))]
    ok = len(levels) == len(scores) and all(level < 4 for level in levels)
    row("systemd-analyze security (live units)", "pass" if ok else "fail", "; ".join(scores))


FINETUNE_CHECK = "appliance-finetune@RUN runs a 2-step job as the service user"
POLKIT_CHECK = "polkit rule: the service user may start fine-tuning units, nothing else"
FINAL = ("activated", "registered", "rejected")


def finetune_start() -> str:
    """Queue a 2-step run as the service user and start its unit without waiting: it trains,
    exports and gates (minutes) while the other checks run; ``finetune_finish`` collects it."""
    records = Path("/tmp/probe-records.jsonl")
    lines = []
    for i in range(12):
        hour = 8 + i % 4
        question = f"Context:\n[doc{i}.md] Room {i} opens at {hour} am.\n\nWhen does it open?"
        answer = f"At {hour} am.\nSource: doc{i}.md"
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        lines.append(json.dumps({"messages": messages}))
    records.write_text("\n".join(lines) + "\n")
    records.chmod(0o644)
    built = as_service_user(
        str(APPLIANCE), "dataset", "build", "--from", str(records), "--out", "probe", "--json"
    )
    if built.returncode != 0:
        raise RuntimeError(f"dataset build: {built.stderr.strip()[-300:]}")
    make = (
        "from pathlib import Path\n"
        "from appliance.core.settings import load_settings\n"
        "from finetune.runs import create_run\n"
        f"s = load_settings(Path('{CONFIG}'))\n"
        "print(create_run(s, 'probe', overrides={'max_steps': 2, 'batch_size': 2, "
        "'max_seq_len': 128, 'save_every': 1}, requested_by='probe').name)\n"
    )
    made = as_service_user(str(PREFIX / ".venv/bin/python"), "-c", make)
    if made.returncode != 0:
        raise RuntimeError(f"create_run: {made.stderr.strip()[-300:]}")
    run_id = made.stdout.strip().splitlines()[-1]
    unit = f"{FINETUNE}{run_id}.service"
    # As the UI does it: the service user asks systemd over D-Bus, and polkit consults the rule
    # that install.sh wrote. Any other unit must stay out of its reach.
    started = as_service_user("systemctl", "start", "--no-block", unit)
    other = as_service_user("systemctl", "start", "--no-block", UI)
    if started.returncode != 0:
        sh("systemctl", "start", "--no-block", unit)  # so the run is still checked
    denied = other.returncode != 0
    row(
        POLKIT_CHECK,
        "pass" if started.returncode == 0 and denied else "fail",
        f"user appliance: systemctl start {FINETUNE}RUN: "
        + ("allowed" if started.returncode == 0 else f"refused ({started.stderr.strip()})")
        + f"; systemctl start {UI}: "
        + (f"refused ({other.stderr.strip()})" if denied else "ALLOWED"),
    )
    return run_id


def finetune_finish(run_id: str, t0: float) -> None:
    unit = f"{FINETUNE}{run_id}.service"
    state_file = DATA / "finetune" / "runs" / run_id / "state.json"

    def state() -> dict[str, object]:
        try:
            loaded = json.loads(state_file.read_text())
        except (OSError, ValueError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

    finished = wait_for(
        lambda: (
            show(unit, "ActiveState")["ActiveState"] in ("inactive", "failed")
            and state().get("status") in (*FINAL, "failed")
        ),
        max(0.0, FINETUNE_BUDGET_S - (time.monotonic() - t0)),
        poll=2,
    )
    took = time.monotonic() - t0
    props = show(unit, "Result", "ExecMainStatus", "User", "NRestarts")
    current = state()
    train = current.get("train")
    steps = train.get("steps", train.get("step", "?")) if isinstance(train, dict) else "?"
    owner = state_file.owner() if state_file.is_file() else "?"
    summary = (
        f"state '{current.get('status', '?')}' after {took:.0f} s, train steps {steps}, unit "
        f"User={props['User']} Result={props['Result']} exit {props['ExecMainStatus']} "
        f"NRestarts={props['NRestarts']}, run files owned by {owner}"
    )
    if not finished:
        sh("systemctl", "stop", unit, timeout=320)
        row(FINETUNE_CHECK, "n/a", f"not done within the probe's {FINETUNE_BUDGET_S} s on this "
            f"CPU (stopped): {summary}")  # fmt: skip
        return
    # A rejected candidate exits 4, a final outcome: the unit must not restart it (a pending
    # restart would keep it "activating", so it would not count as finished above).
    ok = (
        current.get("status") in FINAL
        and props["User"] == "appliance"
        and owner == "appliance"
        and props["NRestarts"] == "0"
    )
    row(FINETUNE_CHECK, "pass" if ok else "fail", summary)
    if not ok:
        (OUT / "finetune.log").write_text(sh("journalctl", "-u", unit, "-o", "cat").stdout)


def journal_secrets() -> None:
    """No password or token in the journal: the first admin's password, the service token, and
    a password set through the CLI."""
    as_service_user(
        str(APPLIANCE), "users", "add", "probeadmin", "--admin", "--password-stdin",
        stdin=SECRET_MARKER + "\n",
    )  # fmt: skip
    secrets = {"a password set with users add": SECRET_MARKER}
    for label, path in (
        ("the first admin's password", DATA / "initial-admin-password"),
        ("the service token", DATA / "service.token"),
    ):
        if path.is_file():
            secrets[label] = path.read_text().strip()
    sh("journalctl", "--sync")
    journal = sh("journalctl", "-b", "-o", "cat", "--no-pager", timeout=120).stdout
    leaked = [label for label, value in secrets.items() if value and value in journal]
    row(
        "the journal holds no password or token",
        "pass" if not leaked else "fail",
        f"searched {len(journal.splitlines())} journal lines for {len(secrets)} secrets ("
        + ", ".join(secrets)
        + ")"
        + (f"; LEAKED: {', '.join(leaked)}" if leaked else ""),
    )


def uninstall() -> None:
    (DOCS / "keep-me.txt").write_text("an admin's document\n")
    run = sh("bash", str(SRC / "install.sh"), "--uninstall", timeout=300)
    units_gone = not any(
        Path("/etc/systemd/system", u).exists() for u in (CORE, UI, "appliance-finetune@.service")
    )
    stopped = not active(CORE) and not active(UI)
    kept = (DATA / "service.token").exists() or any(DATA.iterdir())
    docs_kept = (DOCS / "keep-me.txt").is_file()
    code_gone = not PREFIX.exists()
    ok = run.returncode == 0 and units_gone and stopped and kept and docs_kept and code_gone
    row(
        "install.sh --uninstall removes the units, keeps the data",
        "pass" if ok else "fail",
        f"units removed: {units_gone}, services stopped: {stopped}, {PREFIX} removed: "
        f"{code_gone}, data kept: {kept}, documents kept: {docs_kept}",
    )


def main() -> int:
    OUT.mkdir(exist_ok=True)
    row("systemd as PID 1", "pass", sh("systemctl", "--version").stdout.splitlines()[0])
    if not install():
        return 1
    only = set(filter(None, os.environ.get("PROBE_ONLY", "").split(",")))

    def wanted(key: str) -> bool:
        return not only or key in only

    run_id, t0 = "", time.monotonic()
    if wanted("finetune"):
        with check(FINETUNE_CHECK):
            run_id = finetune_start()
    steps: list[tuple[str, Callable[[], None]]] = [
        ("ui", ui_health),
        ("doctor", doctor),
        ("search", document_search),
        ("ready", readiness),
        ("kill9", kill9),
        ("watchdog", watchdog),
        ("sandbox", sandbox),
        ("limits", resource_limits),
        ("security", security_scores),
    ]
    for key, step in steps:
        if wanted(key):
            with check(key):
                step()
    if run_id:
        with check(FINETUNE_CHECK):
            finetune_finish(run_id, t0)
    # After the fine-tuning run: this re-installs the code that run imports from.
    for key, step in (
        ("firewall", firewall),
        ("journal", journal_secrets),
        ("ignored", ignored_options),
    ):
        if wanted(key):
            with check(key):
                step()
    with check("uninstall"):
        uninstall()
    return 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        with contextlib.suppress(Exception):
            (OUT / "journal.txt").write_text(
                sh("journalctl", "-b", "--no-pager", timeout=60).stdout
            )
        (OUT / "done").write_text("done\n")
        sh("systemctl", "poweroff", "--no-block")
    sys.exit(code)
