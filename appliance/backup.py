"""Backup and restore of a data folder: ``appliance backup FILE`` and ``appliance restore FILE``.

A backup is one tar file (gzip-compressed when FILE ends in ``.gz`` or ``.tgz``) that mirrors the
data folder's layout, with ``manifest.json`` as its last member::

    index/<collection>/...   the Qdrant Edge shards (store.mode=edge only)
    ingest.sqlite3           the ingestion state   \\
    conversations.sqlite3    conversations          > copied with SQLite's online backup API
    accounts.sqlite3         users and sessions    /
    audit/audit.jsonl        the audit log (its chain is verified when copied and when restored)
    models/registry.json     the model registry; the model files themselves with --include-models
    manifest.json            format version, creation time, a settings summary, the embedding
                             model id, the collection, and the sha256 and size of every member

Consistency. Qdrant Edge 0.9 cannot create snapshots (``EdgeShard`` only unpacks and applies
them), so the shard folders are copied while no write can happen: under the data-folder lock
when no service runs, or, when the core service owns the folder, inside the service (``POST
/admin/backup``) with the indexer's writes held and the store flushed. The ingestion state is
copied inside the same hold, so index and state agree. With ``store.mode=server`` the index
lives on the Qdrant server: only local state is backed up, and the manifest says so (back the
collection up with the server's own snapshots).

Restore refuses a data folder that is not empty unless ``--force``, which moves the old content
aside (never deletes it). It extracts only regular files and folders with relative, normalised
names (no absolute paths, ``..``, links or devices), checks every member against the manifest's
sha256, verifies the audit chain, and checks that each restored shard holds exactly the live
chunks of the restored ingestion state, before anything is moved into the data folder.

The manifest is not signed: it detects damage and edits of members, not a forger who also
rewrites the manifest. Keep backups where the appliance's users cannot write.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from appliance import __version__
from appliance.core.errors import ApplianceError
from appliance.core.hashing import file_sha256
from appliance.core.settings import Settings

if TYPE_CHECKING:
    from appliance.wiring import Ingestion

log = logging.getLogger(__name__)

FORMAT = "appliance-backup"
VERSION = 1
MANIFEST = "manifest.json"
REGISTRY = "registry.json"
SQLITE_FILES = ("ingest.sqlite3", "conversations.sqlite3", "accounts.sqlite3")
"""The SQLite databases, by their names in the data folder (``Settings.*_path``)."""
KEEP_IN_PLACE = frozenset({"owner.lock"})
"""Entries of a data folder that restore neither counts as content nor moves aside: the lock
the restoring process itself holds."""
_CHUNK = 1 << 20


class BackupError(ApplianceError):
    """A backup cannot be written, or a backup file is damaged, altered or unsafe to restore."""


# --- helpers ---------------------------------------------------------------------------------


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes what ``tarfile`` copies out of it (one pass per file)."""

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__()
        self._raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _open_for_writing(path: Path) -> tarfile.TarFile:
    """Gzip for .gz and .tgz names, plain tar otherwise (restore detects which)."""
    if path.name.endswith((".gz", ".tgz")):
        return tarfile.open(
            path.parent / f".{path.name}.partial", "w:gz", format=tarfile.PAX_FORMAT
        )
    return tarfile.open(path.parent / f".{path.name}.partial", "w", format=tarfile.PAX_FORMAT)


def _sqlite_copy(src: Path, dest: Path) -> None:
    """A consistent copy of a live database (other processes may write meanwhile)."""
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=30)
    try:
        target = sqlite3.connect(dest)
        try:
            source.backup(target)
            # One self-contained file: the restored database needs no -wal beside it.
            target.execute("PRAGMA journal_mode=DELETE")
        finally:
            target.close()
    finally:
        source.close()


@contextlib.contextmanager
def _audit_shared_lock(path: Path) -> Iterator[None]:
    """Hold off audit appends (``AuditLog`` takes LOCK_EX) while the file is copied."""
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@dataclass
class _Writer:
    """Adds members to the tar and records their sha256 and size for the manifest."""

    tar: tarfile.TarFile
    members: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add_file(self, src: Path, name: str) -> dict[str, Any]:
        st = src.stat()
        info = tarfile.TarInfo(name)
        info.size = st.st_size
        info.mtime = int(st.st_mtime)
        info.mode = 0o600
        with src.open("rb") as fh:
            reader = _HashingReader(fh)
            self.tar.addfile(info, reader)
        if reader.size != st.st_size:
            raise BackupError(f"{src} changed while it was being backed up; try again")
        entry = {"sha256": reader.digest.hexdigest(), "size": st.st_size}
        self.members[name] = entry
        return entry

    def add_tree(self, root: Path, prefix: str) -> None:
        for path in sorted(root.rglob("*")):
            if path.is_symlink():
                raise BackupError(f"{path} is a symbolic link; the data folder holds none")
            if path.is_file():
                self.add_file(path, f"{prefix}/{path.relative_to(root).as_posix()}")

    def add_bytes(self, data: bytes, name: str) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = int(time.time())
        info.mode = 0o600
        self.tar.addfile(info, io.BytesIO(data))


# --- backup ----------------------------------------------------------------------------------


def _settings_summary(settings: Settings) -> dict[str, Any]:
    """What a restore needs to know about the source; never a secret (no API keys)."""
    return {
        "data_dir": str(settings.data_dir),
        "docs_dir": str(settings.ingest.docs_dir),
        "store_mode": settings.store.mode,
        "store_url": settings.store.url,
        "collection_prefix": settings.store.collection_prefix,
        "embedding_model_path": str(settings.embedding.model_path or ""),
        "chunking": settings.chunking.model_dump(),
        "chat_backend": settings.chat.backend,
    }


def _index_facts(state_copy: Path) -> dict[str, Any]:
    """The active collection and embedding model, and live chunks per collection, read from
    the copy of the ingestion state taken with the index (no model is loaded)."""
    from ingest.state import ACTIVE_COLLECTION, ACTIVE_MODEL_ID

    facts: dict[str, Any] = {"collection": None, "embedding_model_id": None, "live_chunks": {}}
    if not state_copy.exists():
        return facts
    db = sqlite3.connect(f"file:{state_copy}?mode=ro", uri=True)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        rows = db.execute(
            "SELECT collection, count(*) FROM chunks WHERE status = 'live' GROUP BY collection"
        ).fetchall()
    finally:
        db.close()
    facts["collection"] = meta.get(ACTIVE_COLLECTION)
    facts["embedding_model_id"] = meta.get(ACTIVE_MODEL_ID)
    facts["live_chunks"] = {str(r[0]): int(r[1]) for r in rows}
    return facts


def _model_files(settings: Settings) -> list[Path]:
    models = settings.models_dir
    if not models.is_dir():
        return []
    return sorted(
        p for p in models.rglob("*") if p.is_file() and not p.is_symlink() and p.name != REGISTRY
    )


def create_backup(
    settings: Settings,
    dest: Path,
    *,
    include_models: bool = False,
    ingestion: Ingestion | None = None,
) -> dict[str, Any]:
    """Write a backup of the data folder to ``dest`` and return its manifest.

    ``ingestion`` is the running service's ``Ingestion``: its writes are held while the index
    and the ingestion state are copied. Without it the caller must own the data folder (see
    ``backup_command``), so nothing else writes the index.
    """
    from appliance.core.audit import verify

    data = settings.data_dir
    dest = dest.resolve()
    if dest.is_relative_to(data.resolve()):
        raise BackupError(f"write the backup outside the data folder {data}, not to {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    staging = Path(tempfile.mkdtemp(prefix=".backup-", dir=dest.parent))
    partial = dest.parent / f".{dest.name}.partial"
    try:
        with _open_for_writing(dest) as tar:
            out = _Writer(tar)
            edge = settings.store.mode == "edge"
            hold = ingestion.indexer.writes_held() if ingestion is not None else None
            paused_s = 0.0
            with hold if hold is not None else contextlib.nullcontext():
                held_at = time.monotonic()
                # The index and the state that describes it, copied at one moment.
                if settings.state_path.exists():
                    _sqlite_copy(settings.state_path, staging / "ingest.sqlite3")
                if edge and settings.index_dir.is_dir():
                    out.add_tree(settings.index_dir, "index")
                paused_s = time.monotonic() - held_at
            if (staging / "ingest.sqlite3").exists():
                out.add_file(staging / "ingest.sqlite3", "ingest.sqlite3")
            for src, name in (
                (settings.conversations_path, "conversations.sqlite3"),
                (settings.accounts_path, "accounts.sqlite3"),
            ):
                if src.exists():
                    _sqlite_copy(src, staging / name)
                    out.add_file(staging / name, name)
            audit: dict[str, Any] = {"included": False}
            if settings.audit_path.exists():
                copy = staging / "audit.jsonl"
                with _audit_shared_lock(settings.audit_path):
                    shutil.copyfile(settings.audit_path, copy)
                result = verify(copy)
                audit = {
                    "included": True,
                    "ok": result.ok,
                    "records": result.records,
                    "last_hash": result.last_hash,
                    "problem": result.problem,
                }
                if not result.ok:
                    log.warning("the audit log does not verify: %s", result.problem)
                out.add_file(copy, "audit/audit.jsonl")
            models: dict[str, Any] = {"included": include_models, "files": []}
            registry = settings.models_dir / REGISTRY
            if registry.exists():
                out.add_file(registry, f"models/{REGISTRY}")
            for path in _model_files(settings):
                name = f"models/{path.relative_to(settings.models_dir).as_posix()}"
                if include_models:
                    entry = out.add_file(path, name)
                else:  # by reference: restore checks the file that is put back by hand
                    entry = {"sha256": file_sha256(path), "size": path.stat().st_size}
                models["files"].append({"path": name, **entry})
            facts = _index_facts(staging / "ingest.sqlite3")
            index: dict[str, Any] = {
                "included": edge,
                "mode": settings.store.mode,
                "collections": sorted(facts["live_chunks"]) if not edge else _shards(settings),
                "live_chunks": facts["live_chunks"],
            }
            if edge:
                index["method"] = (
                    "shard folders copied with writes held and the store flushed "
                    "(Qdrant Edge 0.9 cannot create snapshots)"
                )
            else:
                index["note"] = (
                    f"the index lives on the Qdrant server {settings.store.url}; this backup "
                    "holds local state only: back the collections up with the server's snapshots"
                )
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "appliance_version": __version__,
                "created": _now_iso(),
                "host": socket.gethostname(),
                "settings": _settings_summary(settings),
                "embedding_model_id": facts["embedding_model_id"],
                "collection": facts["collection"],
                "index": index,
                "audit": audit,
                "models": models,
                "writes_held_s": round(paused_s, 3),
                "members": out.members,
            }
            out.add_bytes(json.dumps(manifest, indent=2, sort_keys=True).encode(), MANIFEST)
        with open(partial, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(partial, dest)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest["seconds"] = round(time.monotonic() - started, 3)
    manifest["path"] = str(dest)
    manifest["bytes"] = dest.stat().st_size
    return manifest


def _shards(settings: Settings) -> list[str]:
    root = settings.index_dir
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


# --- restore ---------------------------------------------------------------------------------


def _safe_name(member: tarfile.TarInfo) -> str:
    """The member's name if it may be extracted: a regular file or folder with a relative,
    normalised name; anything else (traversal, absolute, links, devices) is refused."""
    name = member.name
    pure = PurePosixPath(name)
    if (
        not name
        or "\\" in name
        or "\x00" in name
        or pure.is_absolute()
        or any(part in ("", ".", "..") for part in name.rstrip("/").split("/"))
    ):
        raise BackupError(f"refused: the backup holds an unsafe member name {name!r}")
    if not (member.isfile() or member.isdir()):
        raise BackupError(
            f"refused: the backup member {name!r} is a link or a special file, not a regular file"
        )
    return pure.as_posix()


def _extract(src: Path, staging: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Extract the backup into ``staging`` safely; return the manifest and what was read."""
    seen: dict[str, dict[str, Any]] = {}
    manifest_bytes: bytes | None = None
    try:
        with tarfile.open(src, "r:*") as tar:
            for member in tar:
                name = _safe_name(member)
                if member.isdir():
                    continue
                if name in seen or (name == MANIFEST and manifest_bytes is not None):
                    raise BackupError(f"refused: the backup holds {name!r} twice")
                stream = tar.extractfile(member)
                if stream is None:
                    raise BackupError(f"refused: cannot read the backup member {name!r}")
                if name == MANIFEST:
                    manifest_bytes = stream.read()
                    continue
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                size = 0
                with open(target, "wb") as fh:
                    while block := stream.read(_CHUNK):
                        digest.update(block)
                        size += len(block)
                        fh.write(block)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.chmod(target, 0o600)
                seen[name] = {"sha256": digest.hexdigest(), "size": size}
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BackupError(f"{src} is not a readable backup: {exc}") from exc
    if manifest_bytes is None:
        raise BackupError(f"{src} has no {MANIFEST}: it is not an appliance backup")
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError as exc:
        raise BackupError(f"the manifest of {src} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{src} is not an appliance backup (no '{FORMAT}' manifest)")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > VERSION:
        raise BackupError(
            f"{src} is a backup of format version {manifest.get('version')}; this appliance "
            f"({__version__}) reads up to version {VERSION}: restore it with a newer appliance"
        )
    return manifest, seen


def _check_members(manifest: dict[str, Any], seen: dict[str, dict[str, Any]]) -> None:
    listed = manifest.get("members")
    if not isinstance(listed, dict):
        raise BackupError("the manifest lists no members")
    for name in sorted(set(listed) | set(seen)):
        if name not in seen:
            raise BackupError(f"refused: the member {name!r} the manifest lists is missing")
        if name not in listed:
            raise BackupError(f"refused: the member {name!r} is not in the manifest")
        if seen[name]["sha256"] != listed[name].get("sha256"):
            raise BackupError(
                f"refused: the member {name!r} does not match its sha256 in the manifest: "
                "the backup is damaged or was altered"
            )


def _check_audit(manifest: dict[str, Any], staging: Path) -> dict[str, Any]:
    from appliance.core.audit import verify

    expected = manifest.get("audit") or {}
    path = staging / "audit" / "audit.jsonl"
    if not expected.get("included"):
        return {"included": False}
    result = verify(path)
    if result.ok != bool(expected.get("ok")) or result.last_hash != expected.get("last_hash"):
        raise BackupError(
            f"refused: the audit log in the backup does not verify as it did when it was "
            f"written ({result.problem or 'a different last record'})"
        )
    if not result.ok:
        log.warning("the audit log was already broken when backed up: %s", result.problem)
    return {"ok": result.ok, "records": result.records, "last_hash": result.last_hash}


def _check_index(manifest: dict[str, Any], staging: Path) -> dict[str, int]:
    """Each restored shard holds exactly the live chunks of the restored state."""
    index = manifest.get("index") or {}
    if not index.get("included") or not (staging / "ingest.sqlite3").exists():
        return {}
    from ingest.state import IngestState

    try:
        import qdrant_edge as qe
    except ImportError:  # the store's own import error names the fix when it is used
        log.warning("qdrant-edge-py is missing: the restored index was not checked")
        return {}
    state = IngestState(staging / "ingest.sqlite3")
    checked: dict[str, int] = {}
    try:
        for name in index.get("collections") or []:
            folder = staging / "index" / name
            live = set(state.chunk_ids(name, "live"))
            if not folder.is_dir():
                if live:
                    raise BackupError(f"refused: the backup lacks the index of {name}")
                continue
            try:
                shard = qe.EdgeShard.load(str(folder))
            except Exception as exc:  # the engine raises plain exceptions
                raise BackupError(
                    f"refused: the index {name} in the backup is unusable: {exc}"
                ) from exc
            try:
                ids: set[str] = set()
                offset = None
                while True:
                    records, offset = shard.scroll(
                        qe.ScrollRequest(offset=offset, limit=2048, with_payload=False)
                    )
                    ids.update(str(r.id) for r in records)
                    if offset is None:
                        break
            finally:
                shard.close()
            if ids != live:
                raise BackupError(
                    f"refused: the index {name} in the backup holds {len(ids)} points but its "
                    f"state names {len(live)} live chunks ({len(ids ^ live)} differ)"
                )
            checked[name] = len(ids)
    finally:
        state.close()
    return checked


def _content(data_dir: Path) -> list[Path]:
    if not data_dir.is_dir():
        return []
    return sorted(p for p in data_dir.iterdir() if p.name not in KEEP_IN_PLACE)


def restore_backup(settings: Settings, src: Path, *, force: bool = False) -> dict[str, Any]:
    """Restore ``src`` into the (empty, or with ``force`` moved-aside) data folder. The caller
    owns the data folder (``restore_command`` takes its lock)."""
    data = settings.data_dir
    if not src.is_file():
        raise BackupError(f"no backup file {src}")
    existing = _content(data)
    if existing and not force:
        shown = ", ".join(p.name for p in existing[:5]) + (" ..." if len(existing) > 5 else "")
        raise BackupError(
            f"the data folder {data} is not empty ({shown}); restore into an empty folder "
            "(--data-dir), or add --force to move its content aside first"
        )
    started = time.monotonic()
    data.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{data.name}.restore-", dir=data.parent))
    try:
        manifest, seen = _extract(src, staging)
        _check_members(manifest, seen)
        audit = _check_audit(manifest, staging)
        index = _check_index(manifest, staging)
        aside = None
        existing = _content(data)
        if existing:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = data.parent / f"{data.name}.before-restore-{stamp}"
            aside.mkdir()
            for path in existing:
                os.replace(path, aside / path.name)
            log.warning("moved the previous content of %s to %s", data, aside)
        for path in sorted(staging.iterdir()):
            os.replace(path, data / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    missing_models = [
        entry["path"]
        for entry in (manifest.get("models") or {}).get("files", [])
        if not (data / entry["path"]).is_file()
        or file_sha256(data / entry["path"]) != entry["sha256"]
    ]
    notes = []
    if missing_models:
        notes.append(
            f"{len(missing_models)} model files are referenced but not in this backup: put "
            "them back under the models folder (their sha256 is in the manifest), or back up "
            "with --include-models"
        )
    if not (manifest.get("index") or {}).get("included"):
        notes.append(
            (manifest.get("index") or {}).get("note")
            or "this backup holds no index: the next start re-indexes the documents folder"
        )
    if manifest["settings"].get("store_mode") != settings.store.mode:
        notes.append(
            f"the backup was made with store.mode={manifest['settings'].get('store_mode')}, "
            f"this appliance uses {settings.store.mode}"
        )
    return {
        "restored": str(data),
        "from": str(src),
        "created": manifest.get("created"),
        "members": len(seen),
        "audit": audit,
        "index_points": index,
        "collection": manifest.get("collection"),
        "embedding_model_id": manifest.get("embedding_model_id"),
        "moved_aside": str(aside) if aside is not None else None,
        "missing_models": missing_models,
        "notes": notes,
        "seconds": round(time.monotonic() - started, 3),
    }
