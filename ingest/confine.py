"""Confining the parser process: what a PDFium or lxml exploit would get is what this leaves.

The parser worker (``ingest.sandbox``) calls :func:`confine` once its libraries are loaded and
before it reads any document. Three layers, each applied where the kernel offers it, and the
result reported (the worker's ready line carries it; ``appliance doctor`` shows it):

1. ``no_new_privs``: nothing it executes can gain privileges (setuid binaries, file caps).
2. **seccomp**: ``socket()`` is refused (``EACCES``) for every family but ``AF_UNIX``, so no TCP,
   UDP, raw or netlink socket can be made; other architectures' and x32 system calls are
   refused outright. The filter is a few BPF instructions built here (no libseccomp).
3. **Landlock** (Linux 5.13+): the filesystem becomes read-only and limited to what the worker
   needs: the Python installation and its packages, this project's ``ingest`` and
   ``appliance`` packages, system libraries and data (``/usr``, ``/lib*``, ``/etc/ld.so.cache``,
   fonts), the staging folder it reads documents from, and a private temporary folder it may
   write (OCR's scratch files). The data folder, ``/etc/appliance``, the documents folder and
   home folders are not on the list, so they cannot be opened at all. With Landlock ABI 4+,
   TCP ``bind`` and ``connect`` are refused as well.

Where Landlock is missing (older kernels), the worker still has layers 1 and 2, and under
systemd the units' own sandboxing (``ProtectSystem=strict``, ``ProtectHome``, ``PrivateTmp``,
``InaccessiblePaths`` of nothing the worker needs) confines the whole service, the worker with
it: :func:`confine` reports ``landlock: null`` with the reason.

The process's environment is emptied by the parent (``ParserSandbox``), which passes only
``PATH``, ``PYTHONPATH``, ``TMPDIR`` and the locale.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# --- prctl / seccomp ---------------------------------------------------------------------------

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_RET_K = 0x06
_AF_UNIX = 1
# (audit arch, socket syscall number, x32 bit or 0)
_ARCHES = {
    "x86_64": (0xC000003E, 41, 0x40000000),
    "aarch64": (0xC00000B7, 198, 0),
}

# --- Landlock ----------------------------------------------------------------------------------

_SYS_CREATE_RULESET = 444
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_EXECUTE = 1 << 0
_WRITE_FILE = 1 << 1
_READ_FILE = 1 << 2
_READ_DIR = 1 << 3
_FS_ALL_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1}
"""Every filesystem right each ABI knows (ABI 5 adds IOCTL_DEV: handled as ABI 3's set plus it)."""
_IOCTL_DEV = 1 << 15
_NET_BIND_TCP = 1 << 0
_NET_CONNECT_TCP = 1 << 1
_READ = _EXECUTE | _READ_FILE | _READ_DIR
_WRITE_DIR = (1 << 4) | (1 << 5) | (1 << 7) | (1 << 8)  # remove dir/file, make dir/regular
_SYSTEM_READ = (
    "/usr",
    "/lib",
    "/lib64",
    "/bin",
    "/etc/ld.so.cache",
    "/etc/fonts",
    "/etc/localtime",
    "/dev/urandom",
    "/proc/self",
)
_SYSTEM_WRITE = ("/dev/null",)
_TRUNCATE = 1 << 14


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _no_new_privs(libc: Any) -> bool:
    return bool(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0)


def _seccomp_program() -> bytes | None:
    arch = _ARCHES.get(platform.machine())
    if arch is None:
        return None
    audit_arch, socket_nr, x32 = arch
    deny = _RET_ERRNO | errno.EACCES
    insns = [
        (_LD_W_ABS, 0, 0, 4),  # 0: A = arch
        (_JEQ_K, 1, 0, audit_arch),  # 1: our arch -> 3
        (_RET_K, 0, 0, _RET_ERRNO | errno.EPERM),  # 2: another ABI: refuse every call
        (_LD_W_ABS, 0, 0, 0),  # 3: A = syscall number
    ]
    if x32:
        insns.append((_JGE_K, 0, 1, x32))  # 4: x32 call -> 5 (refuse), else -> 6
        insns.append((_RET_K, 0, 0, _RET_ERRNO | errno.EPERM))  # 5
    insns += [
        (_JEQ_K, 0, 3, socket_nr),  # socket() -> next, else -> allow
        (_LD_W_ABS, 0, 0, 16),  # A = args[0], the family (low word)
        (_JEQ_K, 1, 0, _AF_UNIX),  # AF_UNIX -> allow
        (_RET_K, 0, 0, deny),
        (_RET_K, 0, 0, _RET_ALLOW),
    ]
    return b"".join(struct.pack("HBBI", *i) for i in insns)


def _seccomp(libc: Any) -> bool:
    program = _seccomp_program()
    if program is None:
        return False
    filters = ctypes.create_string_buffer(program)
    fprog = struct.pack("HxxxxxxP", len(program) // 8, ctypes.addressof(filters))
    fprog_buf = ctypes.create_string_buffer(fprog)
    return bool(libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, fprog_buf, 0, 0) == 0)


def landlock_abi(libc: Any | None = None) -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is unavailable."""
    libc = libc or _libc()
    version = libc.syscall(_SYS_CREATE_RULESET, None, 0, _CREATE_RULESET_VERSION)
    return max(0, int(version))


def _landlock(libc: Any, read: Sequence[Path], write: Sequence[Path]) -> tuple[int, str]:
    abi = landlock_abi(libc)
    if abi < 1:
        return 0, "the kernel has no Landlock (needs Linux 5.13+ with landlock in lsm=)"
    fs_all = _FS_ALL_BY_ABI[min(abi, 3)] | (_IOCTL_DEV if abi >= 5 else 0)
    net_all = (_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 else 0
    attr = struct.pack("QQ", fs_all, net_all) if abi >= 4 else struct.pack("Q", fs_all)
    ruleset = libc.syscall(_SYS_CREATE_RULESET, ctypes.c_char_p(attr), len(attr), 0)
    if ruleset < 0:
        return 0, f"landlock_create_ruleset failed: {os.strerror(ctypes.get_errno())}"
    try:
        writing = _READ | _WRITE_FILE | _WRITE_DIR | _TRUNCATE | _IOCTL_DEV
        for paths, rights in ((read, _READ), (write, writing)):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue  # absent here (no /lib64 on some systems): nothing to allow
                try:
                    is_dir = os.path.isdir(path)
                    file_rights = rights & ~(_READ_DIR | _WRITE_DIR)
                    allowed = (rights if is_dir else file_rights) & fs_all
                    rule = struct.pack("=Qi", allowed, fd)
                    if libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, rule, 0) < 0:
                        err = os.strerror(ctypes.get_errno())
                        return 0, f"landlock_add_rule({path}) failed: {err}"
                finally:
                    os.close(fd)
        if libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0) < 0:
            return 0, f"landlock_restrict_self failed: {os.strerror(ctypes.get_errno())}"
    finally:
        os.close(ruleset)
    return abi, "filesystem limited to the read list" + (" and no TCP" if net_all else "")


def python_paths() -> list[Path]:
    """What the interpreter and this project's packages are read from."""
    paths = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix)}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        value = sysconfig.get_paths().get(key)
        if value:
            paths.add(Path(value))
    here = Path(__file__).resolve().parent
    paths |= {here, here.parent / "appliance"}
    return sorted(paths)


def confine(*, read: Sequence[Path] = (), write: Sequence[Path] = ()) -> dict[str, Any]:
    """Confine this process for good (see the module docstring); what applied and why not."""
    libc = _libc()
    report: dict[str, Any] = {"no_new_privs": _no_new_privs(libc)}
    report["seccomp"] = report["no_new_privs"] and _seccomp(libc)
    allowed_read = [*python_paths(), *(Path(p) for p in _SYSTEM_READ), *map(Path, read)]
    allowed_write = [*(Path(p) for p in _SYSTEM_WRITE), *map(Path, write)]
    abi, why = _landlock(libc, allowed_read, allowed_write)
    report["landlock"] = abi or None
    report["landlock_note"] = why
    return report
