"""The model registry: every servable model version, its lineage, and which one is active.

One JSON file, ``models_dir/registry.json``, shared by the CLI and the core service::

    {"format": 1, "active": "v2",
     "versions": {"base": {...}, "v1": {...}, "v2": {...}},
     "history": [{"version": "base", "at": ..., "by": ..., "previous": null}, ...]}

Every change re-reads the file under an exclusive ``flock`` on ``registry.lock`` and replaces it
atomically (temporary file, fsync, rename, fsync of the folder), so two processes never lose
each other's writes and a reader never sees half a file. Readers take no lock: a rename is
atomic, so they see the old file or the new one.

"base" is the packaged (or configured) GGUF the fine-tunes start from; fine-tuned versions are
"v1", "v2", ... A registered version is not served until it is activated, and activation
refuses a version whose gate failed (unless forced) or whose files are missing or changed:
model files are trusted only by hash.

Every version records its **audience**, the collections its training data drew on
(``appliance.core.audience``): the base's is empty, a fine-tune's comes from its dataset's manifest,
and a version registered without one has an unknown audience. The core service answers a user
with the active version only when the user may read its whole audience, else with the first
version of ``serving_order`` they may use.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.core.audience import normalise as normalise_audience
from appliance.core.errors import ModelError

if TYPE_CHECKING:
    from appliance.core.settings import Settings

REGISTRY_FILE = "registry.json"
LOCK_FILE = "registry.lock"
FORMAT = 1
BASE = "base"
_VERSION = re.compile(r"v(\d+)")

# (path, size, mtime_ns) -> sha256, shared by every registry in the process: hashing a 100 MB
# GGUF takes about 0.3 s, and the service checks the active model on every reload. A file that
# is rewritten changes its size or mtime_ns, hence the key, so a stale hash is never reused.
_HASH_CACHE: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def cached_sha256(path: Path) -> str:
    """The file's sha256, from the cache when its path, size and mtime are unchanged."""
    from appliance.core.hashing import file_sha256

    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _HASH_LOCK:
        known = _HASH_CACHE.get(key)
    if known is not None:
        return known
    digest = file_sha256(path)
    with _HASH_LOCK:
        _HASH_CACHE[key] = digest
    return digest


def _gate_metrics(record: Mapping[str, Any]) -> dict[str, Any] | None:
    gate = record.get("gate") or {}
    return gate.get("metrics") if isinstance(gate, Mapping) else None


class ModelRegistry:
    """The registry in ``models_dir``. Cheap to construct; every call re-reads the file, so
    several instances (processes) on one folder see each other's changes."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = Path(models_dir)
        self.path = self.models_dir / REGISTRY_FILE
        self._lock_path = self.models_dir / LOCK_FILE

    # --- storage ---------------------------------------------------------------------------

    def _empty(self) -> dict[str, Any]:
        return {"format": FORMAT, "active": None, "versions": {}, "history": []}

    def _read(self) -> dict[str, Any]:
        try:
            text = self.path.read_text("utf-8")
        except FileNotFoundError:
            return self._empty()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(
                f"the model registry {self.path} is not valid JSON ({exc}); restore it from a "
                "backup (appliance backup) or move it aside to start a new one"
            ) from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ModelError(
                f"the model registry {self.path} has an unknown format "
                f"({data.get('format') if isinstance(data, dict) else type(data).__name__}); "
                f"this appliance reads format {FORMAT}"
            )
        return data

    def _write(self, data: dict[str, Any]) -> None:
        fd, name = tempfile.mkstemp(prefix=".registry-", suffix=".tmp", dir=self.models_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, ensure_ascii=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(name, self.path)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        # The rename itself must reach the disk too, or a crash could bring the old file back.
        dir_fd = os.open(self.models_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write under the folder's exclusive lock; written when the block ends
        without an exception."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        with self._lock_path.open("a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                data = self._read()
                yield data
                self._write(data)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    # --- change detection ------------------------------------------------------------------

    def stamp(self) -> int:
        """A cheap token that changes whenever the registry is rewritten (0: no registry yet).

        Every write renames a new file into place, so the inode changes even when two writes
        fall within the file system's timestamp granularity."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return 0
        return hash((st.st_ino, st.st_mtime_ns, st.st_size))

    def changed_since(self, token: int) -> bool:
        return self.stamp() != token

    # --- versions --------------------------------------------------------------------------

    def ensure_base(self, gguf: Path) -> dict[str, Any]:
        """Register ``gguf`` as "base" (with its sha256) unless the same file already is; the
        first base becomes active. A different file at "base" is an error, not a silent swap."""
        gguf = Path(gguf).resolve()
        if not gguf.is_file():
            raise ModelError(f"the base model {gguf} does not exist; give a GGUF file")
        digest = cached_sha256(gguf)
        with self._transaction() as data:
            known = data["versions"].get(BASE)
            if known is not None:
                if known["gguf"]["sha256"] != digest:
                    raise ModelError(
                        f"the registered base ({known['gguf']['path']}, sha256 "
                        f"{known['gguf']['sha256'][:12]}) is not {gguf} (sha256 {digest[:12]}); "
                        "fine-tuned versions descend from the registered base: restore it, or "
                        "start a new models folder"
                    )
                return dict(known)
            record: dict[str, Any] = {
                "version": BASE,
                "created": _now(),
                "parent": None,
                "gguf": {
                    "path": str(gguf),
                    "sha256": digest,
                    "size": gguf.stat().st_size,
                    "quantization": _quantization_from_name(gguf.name),
                },
                "gate": None,
                "audience": [],  # it learned nothing from the documents
                "notes": "the model the appliance ships with (or the configured base)",
            }
            data["versions"][BASE] = record
            if data["active"] is None:
                data["active"] = BASE
                data["history"].append(
                    {"version": BASE, "at": _now(), "by": "auto", "previous": None}
                )
            return dict(record)

    def register(self, record: Mapping[str, Any]) -> str:
        """Add a fine-tuned version; returns its id ("v1", "v2", ...). It is not activated.

        ``record`` needs ``gguf.path``; the GGUF's sha256 and size are (re)computed here, so the
        registry never trusts a hash it did not take itself. Everything else (parent, run_id,
        dataset_sha256, config, adapter, merged_model, f16_gguf, lora_gguf, ollama_tag, gate,
        notes) is kept as given. ``audience`` (the collections the training data drew on) is
        stored sorted; without it the version's audience is unknown (null) and it answers only
        the host's operators.
        """
        rec = json.loads(json.dumps(dict(record), default=str))  # a JSON-clean deep copy
        gguf_info = rec.get("gguf")
        if not isinstance(gguf_info, dict) or not gguf_info.get("path"):
            raise ModelError("a registered version needs gguf.path (the served GGUF file)")
        gguf = Path(gguf_info["path"]).resolve()
        if not gguf.is_file():
            raise ModelError(f"the GGUF {gguf} of the new version does not exist")
        gguf_info.update(path=str(gguf), sha256=cached_sha256(gguf), size=gguf.stat().st_size)
        gguf_info.setdefault("quantization", _quantization_from_name(gguf.name))
        rec.setdefault("parent", BASE)
        rec.setdefault("created", _now())
        rec.setdefault("gate", None)
        rec["audience"] = normalise_audience(rec.get("audience"))
        with self._transaction() as data:
            if rec["parent"] not in data["versions"]:
                raise ModelError(
                    f"the parent version {rec['parent']!r} is not registered; register the base "
                    "first (ensure_base)"
                )
            numbers = [int(m.group(1)) for v in data["versions"] if (m := _VERSION.fullmatch(v))]
            version = f"v{max(numbers, default=0) + 1}"
            rec["version"] = version
            data["versions"][version] = rec
        return version

    def update(self, version: str, **fields: Any) -> dict[str, Any]:
        """Set top-level fields of a version (e.g. ``ollama_tag``, ``notes``); not its files."""
        if {"gguf", "version"} & fields.keys():
            raise ModelError("a version's gguf and id cannot change; register a new version")
        with self._transaction() as data:
            record = self._lookup(data, version)
            record.update(json.loads(json.dumps(fields, default=str)))
            return dict(record)

    def _lookup(self, data: Mapping[str, Any], version: str) -> dict[str, Any]:
        record = data["versions"].get(version)
        if record is None:
            known = ", ".join(data["versions"]) or "none"
            raise ModelError(f"no model version {version!r}; registered: {known}")
        return record

    def has_version(self, version: str) -> bool:
        return version in self._read()["versions"]

    def get(self, version: str) -> dict[str, Any]:
        data = self._read()
        record = dict(self._lookup(data, version))
        record["active"] = data["active"] == version
        return record

    def versions(self) -> list[dict[str, Any]]:
        """Every version, base first then v1, v2, ...; each with ``active``, the GGUF path as
        ``gguf`` (the full entry as ``gguf_file``) and the gate's metrics as ``metrics``."""
        data = self._read()
        out = []
        for version in sorted(data["versions"], key=_version_order):
            record = dict(data["versions"][version])
            record["active"] = data["active"] == version
            record["gguf_file"] = record["gguf"]
            record["gguf"] = record["gguf"]["path"]
            gate = record.get("gate") or {}
            record["gate_passed"] = gate.get("passed") if isinstance(gate, dict) else None
            record["metrics"] = _gate_metrics(record)
            out.append(record)
        return out

    def active(self) -> dict[str, Any]:
        data = self._read()
        if data["active"] is None:
            raise ModelError(
                f"no model version is active in {self.models_dir}; register the base first"
            )
        record = dict(self._lookup(data, data["active"]))
        record["active"] = True
        return record

    def active_version(self) -> str | None:
        return self._read()["active"]

    def history(self) -> list[dict[str, Any]]:
        return list(self._read()["history"])

    def serving_order(self) -> list[dict[str, Any]]:
        """The versions a reader may be answered by, in order of preference: the active one,
        then the newest first, the base last. Left out: versions whose gate failed (unless an
        admin activated them anyway) and versions a rollback left (until activated again), so
        a fallback never brings back what an admin rejected."""
        data = self._read()
        history = data["history"]
        left: set[str] = set()
        forced: set[str] = set()
        for entry in history:
            version = str(entry.get("version"))
            left.discard(version)
            if entry.get("rollback_from"):
                left.add(str(entry["rollback_from"]))
            if entry.get("forced"):
                forced.add(version)
        active = data["active"]
        out = []
        for version in sorted(data["versions"], key=_version_order, reverse=True):
            record = dict(data["versions"][version])
            gate = record.get("gate")
            failed = isinstance(gate, dict) and gate.get("passed") is False
            excluded = version in left or (failed and version not in forced)
            if excluded and version not in (active, BASE):  # the base is the last resort
                continue
            record["active"] = version == active
            out.append(record)
        # the active version first; the base stays last (``_version_order`` sorts it first)
        out.sort(key=lambda r: (not r["active"], r["version"] == BASE))
        return out

    # --- activation ------------------------------------------------------------------------

    def _check_files(self, record: Mapping[str, Any]) -> Path:
        info = record["gguf"]
        path = Path(info["path"])
        if not path.is_file():
            raise ModelError(
                f"model version {record['version']!r}: its GGUF {path} is missing; restore it "
                "or activate another version"
            )
        digest = cached_sha256(path)
        if digest != info["sha256"]:
            raise ModelError(
                f"model version {record['version']!r}: {path} has changed (sha256 {digest[:12]}, "
                f"registered {info['sha256'][:12]}); model files are trusted only by hash: "
                "restore the file or export and register the version again"
            )
        return path

    def activate(self, version: str, *, force: bool = False, by: str = "") -> dict[str, Any]:
        """Make ``version`` the served model; returns its record. Refuses a version whose gate
        failed (``force`` overrides that, never a missing or changed file)."""
        with self._transaction() as data:
            record = self._lookup(data, version)
            gate = record.get("gate")
            if isinstance(gate, dict) and gate.get("passed") is False and not force:
                report = gate.get("report") or "no report"
                raise ModelError(
                    f"model version {version!r} failed its gate ({report}); activate it anyway "
                    "with --force if you accept the regression"
                )
            self._check_files(record)
            previous = data["active"]
            data["active"] = version
            data["history"].append(
                {
                    "version": version,
                    "at": _now(),
                    "by": by,
                    "previous": previous,
                    "forced": bool(
                        force and isinstance(gate, dict) and gate.get("passed") is False
                    ),
                }
            )
            out = dict(record)
        out["active"] = True
        return out

    def rollback(self, *, by: str = "") -> str:
        """Back to the version that was active before the current one; returns its id.

        Activations form a stack that rollbacks pop, so repeated rollbacks keep going back
        (v3 -> v2 -> base) rather than toggling between the last two."""
        with self._transaction() as data:
            current = data["active"]
            if current is None:
                raise ModelError("no model version is active; nothing to roll back")
            stack = _activation_stack(data["history"])
            if len(stack) < 2:
                raise ModelError(
                    f"{current!r} was not activated over another version; nothing to roll back to"
                )
            target = stack[-2]
            if target not in data["versions"]:
                raise ModelError(f"the previous version {target!r} is no longer registered")
            self._check_files(data["versions"][target])
            data["active"] = target
            data["history"].append(
                {
                    "version": target,
                    "at": _now(),
                    "by": by,
                    "previous": current,
                    "rollback_from": current,
                }
            )
            return target

    def verified_gguf(self, version: str | None = None) -> Path:
        """The GGUF of ``version`` (default: the active one) after checking its sha256 (cached
        by path, size and mtime); ``ModelError`` when it is missing or changed."""
        data = self._read()
        name = version or data["active"]
        if name is None:
            raise ModelError(f"no model version is active in {self.models_dir}")
        return self._check_files(self._lookup(data, name))


def _activation_stack(history: list[dict[str, Any]]) -> list[str]:
    """Replay the history: an activation pushes its version (unless it is already on top), a
    rollback pops the version it left."""
    stack: list[str] = []
    for entry in history:
        if entry.get("rollback_from"):
            if stack:
                stack.pop()
            if not stack or stack[-1] != entry["version"]:
                stack.append(entry["version"])  # a history from before this rule existed
        elif not stack or stack[-1] != entry["version"]:
            stack.append(entry["version"])
    return stack


def _version_order(version: str) -> tuple[int, int, str]:
    if version == BASE:
        return (0, 0, version)
    m = _VERSION.fullmatch(version)
    return (1, int(m.group(1)), version) if m else (2, 0, version)


def _quantization_from_name(name: str) -> str | None:
    """Best effort from llama.cpp's naming habit (``model.Q4_K_M.gguf``); None when unsure."""
    upper = name.upper()
    for q in ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q3_K_M", "Q3_K_S", "Q3_K_L", "Q6_K",
              "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "BF16", "F16", "F32"):  # fmt: skip
        if q in upper:
            return q
    return None


def base_gguf_for(settings: Settings) -> Path:
    """The GGUF registered as "base": finetune.base_model_path when it is a GGUF, else the
    configured chat model file, else the packaged SmolLM2."""
    configured = settings.finetune.base_model_path
    if configured is not None and configured.suffix.lower() == ".gguf":
        return configured
    if settings.chat.model_path is not None:
        return settings.chat.model_path
    from appliance.core.chat_settings import default_chat_model_path

    return default_chat_model_path()


def registry_for(settings: Settings) -> ModelRegistry:
    """The registry of ``settings.models_dir``, with its base registered (hashed once)."""
    registry = ModelRegistry(settings.models_dir)
    if not registry.has_version(BASE):
        registry.ensure_base(base_gguf_for(settings))
    return registry
