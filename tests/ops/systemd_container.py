"""A Debian rootfs booted by ``systemd-nspawn``: a real systemd (PID 1) for the boot test.

The rootfs is built once by ``debootstrap`` into a cache folder keyed by a hash of its recipe
(``rootfs_dir``), so a changed recipe builds a new one and an unchanged one is reused across runs.
It is built under a temporary name and renamed into place only when complete, under a lock: a
killed build leaves a ``.partial`` folder that the next build removes, never a half rootfs that
looks usable.

Each boot runs on a throwaway copy of the cached rootfs (``scratch_copy``), so the cache stays as
``debootstrap`` left it. ``boot`` starts the container with no network but loopback and returns
what it printed on the console, where the probe unit writes its table.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# systemd as PID 1 and its bus; python3 to run the appliance (3.11, like the host's venv);
# iproute2 to give loopback a non-loopback address for the firewall check; acl for the documents
# folder's default ACLs; procps; libgomp1, the OpenMP runtime that the host-built llama.cpp links
# to.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "iproute2",
    "acl",
    "procps",
    "libgomp1",
)
# polkitd (the fine-tuning rule) fails to configure inside debootstrap's own install here, and
# installs cleanly with apt in the finished rootfs: a second stage.
SECOND_STAGE = ("polkitd",)
RECIPE = (
    f"debootstrap --variant=minbase --include={','.join(PACKAGES)} {SUITE} {MIRROR}; "
    f"apt-get install --no-install-recommends {' '.join(SECOND_STAGE)}"
)
HOST_PACKAGES = {"systemd-nspawn": "systemd-container", "debootstrap": "debootstrap"}


class Unavailable(RuntimeError):
    """The container cannot be had here (not root, no packages, no mirror): a reason to skip."""


def cache_root() -> Path:
    """Where rootfs builds are kept: ``$APPLIANCE_TEST_CACHE`` or ``~/.cache/appliance-tests``."""
    env = os.environ.get("APPLIANCE_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "appliance-tests"


def rootfs_dir(root: Path | None = None) -> Path:
    digest = hashlib.sha256(RECIPE.encode()).hexdigest()[:12]
    return (root or cache_root()) / f"rootfs-{SUITE}-{digest}"


def ensure_host_tools(timeout: float = 300) -> None:
    """Install systemd-nspawn and debootstrap with apt where missing (root only)."""
    if os.geteuid() != 0:
        raise Unavailable("needs root (systemd-nspawn and debootstrap)")
    missing = [pkg for tool, pkg in HOST_PACKAGES.items() if shutil.which(tool) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise Unavailable(f"{', '.join(missing)} missing and no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for args in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        run = subprocess.run(
            args, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if run.returncode != 0:
            raise Unavailable(f"`{' '.join(args)}` failed: {run.stderr.strip()[-300:]}")


def build_rootfs(root: Path | None = None, timeout: float = 900) -> Path:
    """The cached rootfs, built by debootstrap when absent; atomic and safe against a parallel
    build (a lock file beside it)."""
    target = rootfs_dir(root)
    if (target / "etc/os-release").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "etc/os-release").is_file():  # built by another process meanwhile
            return target
        partial = target.with_name(target.name + ".partial")
        remove(partial)
        run = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(partial),
                MIRROR,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if run.returncode != 0:
            tail = (run.stdout + run.stderr).strip()[-500:]
            log = partial / "debootstrap/debootstrap.log"
            if log.is_file():
                shutil.copy(log, target.with_name(target.name + ".failed.log"))
            remove(partial)
            raise Unavailable(f"debootstrap failed (no Debian mirror?): {tail}")
        _second_stage(partial, timeout)
        # The recipe, for whoever finds the folder.
        (partial / "etc/appliance-test-rootfs").write_text(RECIPE + "\n")
        partial.rename(target)
    # Rootfs of earlier recipes are never used again: a few hundred MB each.
    for old in target.parent.glob(f"rootfs-{SUITE}-*"):
        if old.is_dir() and old.name != target.name and not old.name.endswith(".partial"):
            remove(old)
    return target


def _second_stage(partial: Path, timeout: float) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = partial / "proc"
    subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
    try:
        run = subprocess.run(
            ["chroot", str(partial), "apt-get", "install", "-y", "-q",
             "--no-install-recommends", *SECOND_STAGE],
            env=env, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
    finally:
        subprocess.run(["umount", "-l", str(proc)], check=False)
    if run.returncode != 0:
        remove(partial)
        raise Unavailable(f"apt-get install {' '.join(SECOND_STAGE)} failed: {run.stderr[-300:]}")


def remove(path: Path) -> None:
    """Remove a folder that a killed debootstrap may have left with /proc, /sys or /dev mounted
    inside: unmount those first, and never cross into another filesystem."""
    if not path.exists():
        return
    inside = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        mounts = [line.split()[4] for line in fh]
    for point in sorted((m for m in mounts if m.startswith(inside)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def scratch_copy(rootfs: Path, dest: Path) -> Path:
    """A throwaway copy of the cached rootfs (hard links would let the boot write into the
    cache: a real copy, which takes a few seconds for a minbase system)."""
    subprocess.run(["cp", "-a", "--reflink=auto", f"{rootfs}/.", str(dest)], check=True)
    return dest


@dataclass(frozen=True)
class Boot:
    returncode: int
    console: str
    timed_out: bool


def boot(
    rootfs: Path,
    *,
    bind_ro: Sequence[tuple[Path, str]] = (),
    bind: Sequence[tuple[Path, str]] = (),
    timeout: float = 900,
    machine: str = "appliance-test",
) -> Boot:
    """Boot ``rootfs`` with systemd as PID 1 until it powers off (or ``timeout``).

    ``--register=no --keep-unit``: the host has no systemd (nor machined) to register with.
    ``--private-network``: only a loopback interface, so nothing inside reaches a network.
    The container gets cgroup v2 (``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1``) even on a host with the
    hybrid layout, as on a Debian 12 appliance: the IP firewall needs it.
    On timeout the container is asked to power off (SIGTERM to nspawn), then killed.
    """
    args = [
        "systemd-nspawn",
        "--quiet",
        "--register=no",
        "--keep-unit",
        "--private-network",
        f"--machine={machine}",
        "-D",
        str(rootfs),
        *(f"--bind-ro={src}:{dst}" for src, dst in bind_ro),
        *(f"--bind={src}:{dst}" for src, dst in bind),
        # systemd's IP firewall (IPAddressDeny=) attaches BPF programs to cgroup v2: allow the
        # bpf() call, which nspawn's own seccomp filter refuses by default.
        "--system-call-filter=bpf",
        "--capability=CAP_BPF",
        "-b",
    ]
    env = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")
    with subprocess.Popen(
        args,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    ) as proc:
        try:
            out, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.terminate()  # nspawn passes it on as a clean poweroff
            try:
                out, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
    return Boot(proc.returncode, out.decode("utf-8", "replace"), timed_out)
