"""The dataset file format, owned here alone: the folder a dataset build writes, the records
of its JSONL files, and the one content hash every reader checks.

    DATA/datasets/NAME/
        train.jsonl        {"messages": [...], "source": "file"|"feedback"|"docs", "id",
                            "collections": [...], "user": the feedback's author or null}
        heldout.jsonl      the same, kept out of training (stratified by source, seeded)
        preferences.jsonl  {"prompt": [messages], "chosen": str, "rejected": str, "id",
                            "collections": [...], "user", "rejected_by"}
        manifest.json      sources and counts, rejections by reason, the golden-overlap drop,
                           split sizes, the settings used, the audience (every collection
                           the records drew on) and the sha256 of the content

Records are written canonically (sorted keys, no spaces), so equal content gives equal bytes and
the hash (``content_sha256``: each content file's name, size and bytes in a fixed order) names
the content. ``dataset_sha256`` is what a run records: the manifest's hash, which a build wrote
from the same digest, or the digest of the files present in a folder without a manifest.
``finetune.dataset`` builds folders; ``finetune.train`` reads them through here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.core.audience import normalise as normalise_audience
from appliance.core.errors import ApplianceError, ConfigError
from appliance.core.settings import Settings

log = logging.getLogger(__name__)

FORMAT = 1
TRAIN, HELDOUT, PREFERENCES, MANIFEST = (
    "train.jsonl",
    "heldout.jsonl",
    "preferences.jsonl",
    "manifest.json",
)
CONTENT_FILES = (TRAIN, HELDOUT, PREFERENCES)
ROLES = ("system", "user", "assistant")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


class DatasetError(ApplianceError):
    """A dataset could not be built or read (a bad input line, a bad name, a changed file)."""


def canonical_json(record: Mapping[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class Example:
    """One supervised chat record, with the question and answer its overlap checks use."""

    messages: tuple[tuple[str, str], ...]
    """(role, content) pairs; the last is the assistant's answer."""
    source: str
    question: str
    answer: str
    collections: tuple[str, ...] = ()
    """The collections of its passages (``finetune.audience``)."""
    user: str | None = None
    """Whose feedback it came from."""

    @property
    def id(self) -> str:
        # content-addressed: the same example from two places is one example, and ids stay
        # stable across rebuilds
        digest = hashlib.sha256(canonical_json({"m": self.messages}).encode()).hexdigest()
        return f"{self.source}-{digest[:16]}"

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "messages": [{"role": r, "content": c} for r, c in self.messages],
            "collections": list(self.collections),
            "user": self.user,
        }


@dataclass(frozen=True)
class Preference:
    prompt: tuple[tuple[str, str], ...]
    chosen: str
    rejected: str
    question: str
    collections: tuple[str, ...] = ()
    """Those of both answers' passages (and models)."""
    user: str | None = None
    """Who approved the chosen answer."""
    rejected_by: str | None = None
    """Who voted the rejected answer down."""

    @property
    def id(self) -> str:
        record = {"p": self.prompt, "c": self.chosen, "r": self.rejected}
        return "pref-" + hashlib.sha256(canonical_json(record).encode()).hexdigest()[:16]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prompt": [{"role": r, "content": c} for r, c in self.prompt],
            "chosen": self.chosen,
            "rejected": self.rejected,
            "collections": list(self.collections),
            "user": self.user,
            "rejected_by": self.rejected_by,
        }


def jsonl_bytes(records: Iterable[Mapping[str, Any]]) -> bytes:
    return "".join(canonical_json(r) + "\n" for r in records).encode("utf-8")


def content_digest(files: Mapping[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in CONTENT_FILES:
        data = files[name]
        digest.update(f"{name}\n{len(data)}\n".encode())
        digest.update(data)
    return digest.hexdigest()


def content_sha256(folder: Path) -> str:
    """The hash of a dataset's content: each content file's name and bytes, in a fixed order
    (the files are written canonically, so equal content gives equal bytes)."""
    return content_digest({name: (folder / name).read_bytes() for name in CONTENT_FILES})


def dataset_sha256(folder: Path) -> str:
    """The hash a run records for its dataset: the manifest's (a built dataset's content hash,
    checked on load), else the content hash of the files present (a hand-made folder)."""
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            sha = json.loads(manifest.read_text(encoding="utf-8")).get("sha256")
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{manifest} is not valid JSON: {exc.msg}") from exc
        if isinstance(sha, str) and sha:
            return sha
    files = {n: (folder / n).read_bytes() for n in CONTENT_FILES if (folder / n).is_file()}
    return content_digest(files)


def recorded_sha256_matches(folder: Path, recorded: str) -> bool:
    """Whether ``recorded`` (from a run's config.json) still names the dataset in ``folder``.

    Runs recorded before the hash was unified digested a manifest-less folder differently
    (name, NUL and bytes of train.jsonl and preferences.jsonl); that digest is still accepted,
    so such a run can be resumed."""
    if dataset_sha256(folder) == recorded:
        return True
    if (folder / MANIFEST).is_file():
        return False
    digest = hashlib.sha256()
    for name in (TRAIN, PREFERENCES):
        path = folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest() == recorded


def validate_name(name: str) -> str:
    if not _NAME.match(name) or ".." in name:
        raise DatasetError(
            f"invalid dataset name {name!r}: use letters, digits, '.', '_' and '-' (up to 80, "
            "starting with a letter or digit), no path separators"
        )
    return name


@dataclass(frozen=True)
class DatasetInfo:
    """A built dataset: where it is, what it holds, and its content hash."""

    name: str
    path: Path
    created: str
    sha256: str
    train: int
    heldout: int
    preferences: int
    sources: dict[str, int] = field(default_factory=dict)
    """Examples (before the split) per source kind: file, feedback, docs."""
    rejected: dict[str, int] = field(default_factory=dict)
    dropped_for_golden_overlap: int = 0
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)
    audience: list[str] | None = None
    """Every collection the records drew on; None for a dataset built before audiences were
    recorded (unknown: a model trained on it answers only the host's operators)."""

    @property
    def train_path(self) -> Path:
        return self.path / TRAIN

    @property
    def heldout_path(self) -> Path:
        return self.path / HELDOUT

    @property
    def preferences_path(self) -> Path:
        return self.path / PREFERENCES

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "created": self.created,
            "sha256": self.sha256,
            "train": self.train,
            "heldout": self.heldout,
            "preferences": self.preferences,
            "sources": self.sources,
            "rejected": self.rejected,
            "dropped_for_golden_overlap": self.dropped_for_golden_overlap,
            "audience": self.audience,
        }


def load_dataset(path: Path, *, verify: bool = True) -> DatasetInfo:
    """A dataset folder's manifest; with ``verify``, its content must still match the hash."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path} is not a dataset folder (no readable {MANIFEST})") from exc
    if verify:
        try:
            actual = content_sha256(path)
        except OSError as exc:
            raise DatasetError(f"dataset {path} is incomplete: {exc}") from exc
        if actual != manifest.get("sha256"):
            raise DatasetError(
                f"dataset {path} changed after it was built (sha256 {actual[:12]}, manifest "
                f"{str(manifest.get('sha256'))[:12]}); build a new one instead of editing it"
            )
    split = manifest.get("split", {})
    return DatasetInfo(
        name=str(manifest.get("name", path.name)),
        path=path,
        created=str(manifest.get("created", "")),
        sha256=str(manifest.get("sha256", "")),
        train=int(split.get("train", 0)),
        heldout=int(split.get("heldout", 0)),
        preferences=int(split.get("preferences", 0)),
        sources=dict(manifest.get("counts_by_source", {})),
        rejected=dict(manifest.get("rejected", {})),
        dropped_for_golden_overlap=int(manifest.get("dropped_for_golden_overlap", 0)),
        manifest=manifest,
        audience=normalise_audience(manifest.get("audience")),
    )


def list_datasets(settings: Settings) -> list[DatasetInfo]:
    """The built datasets, oldest first (unverified: listing must stay cheap)."""
    root = settings.datasets_dir
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and not folder.name.startswith(".") and (folder / MANIFEST).is_file():
            try:
                found.append(load_dataset(folder, verify=False))
            except DatasetError as exc:
                log.warning("skipping %s: %s", folder, exc)
    return sorted(found, key=lambda d: (d.created, d.name))


def dataset_path(settings: Settings, name: str) -> Path:
    return settings.datasets_dir / validate_name(name)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a dataset file, one per line; a bad line fails with its number."""
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{number} is not valid JSON: {exc.msg}") from exc
            if not isinstance(record, dict):
                raise ConfigError(f"{path}:{number} is not a JSON object")
            records.append(record)
    return records


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """A record's chat messages as plain dicts; anything else fails, naming ``where``."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list")
    for message in messages:
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise ConfigError(
                f"{where}: each message needs a role (system, user or assistant) and a text "
                f"content, not {message!r:.120}"
            )
    return [{"role": m["role"], "content": m["content"]} for m in messages]
