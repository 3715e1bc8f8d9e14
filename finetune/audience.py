"""The audience of training data: which collections each example drew on, and restricting a
dataset build to some collections (``appliance dataset build --collections A,B``).

An example's collections are those of its passages (a feedback answer's cited sources, a
synthetic pair's chunk), plus, for feedback, the audience of the model version that wrote the
answer: a fine-tuned model can repeat what it learned, so its answers carry its audience into
the next dataset. An admin's instruction file names no documents; a record may say which
collections it comes from with ``"collections": [...]``. A dataset's audience is the union over
all its records (held-out ones too: the gate report shows them), written in its manifest; a
model version trained on it inherits it (``finetune.runs``, ``finetune.registry``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from appliance.core.audience import SHARED, Audience, collection_of, normalise
from appliance.core.errors import ApplianceError

ROOT_NAMES = (".",)
"""How ``--collections`` names the documents at the root of the folder (no folder can be
called "."), besides an empty item."""


def parse_collections(values: Sequence[str] | None) -> frozenset[str] | None:
    """``--collections`` values (each may be a comma-separated list; ``.`` or an empty item is
    the shared root collection) as a set, or None when not given."""
    if not values:
        return None
    out: set[str] = set()
    for value in values:
        for item in value.split(","):
            name = item.strip()
            if name in ROOT_NAMES:
                name = SHARED
            if name in ("..",) or any(c in name for c in "/\\\0"):
                raise ApplianceError(
                    f"--collections: {name!r} is not a collection; name top-level folders of "
                    "the documents folder (e.g. --collections hr,legal; '.' for the root)"
                )
            out.add(name)
    return frozenset(out)


def check_known(collections: Iterable[str], docs_dir: Path) -> None:
    """Refuse a collection that is no folder of the documents folder (a typo would otherwise
    build an empty dataset without a word)."""
    if not docs_dir.is_dir():
        return
    known = {p.name for p in docs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    unknown = sorted(c for c in collections if c != SHARED and c not in known)
    if unknown:
        raise ApplianceError(
            f"--collections: no folder {', '.join(repr(u) for u in unknown)} in {docs_dir}; "
            f"the collections are: {', '.join(sorted(known)) or 'none'} ('.' for the root)"
        )


def of_paths(paths: Iterable[str]) -> tuple[str, ...]:
    """The collections of documents, sorted."""
    return tuple(sorted({collection_of(str(p)) for p in paths if str(p)}))


def of_record(value: Any) -> tuple[str, ...]:
    """An instruction-file record's own ``collections`` (a list of folder names); ValueError
    when it is not one."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("'collections' must be a list of collection (folder) names")
    return tuple(sorted({SHARED if v in ROOT_NAMES else v for v in value}))


def within(collections: Iterable[str], allowed: Audience | None) -> bool:
    return allowed is None or set(collections) <= allowed


def union(groups: Iterable[Iterable[str]]) -> list[str]:
    out: set[str] = set()
    for group in groups:
        out.update(group)
    return sorted(out)


def model_audiences(models_dir: Path) -> dict[str, Audience | None]:
    """Every registered version's audience by the name its answers carry
    (``<gguf file name>@sha256:<12 hex>``, ``LlamaCppChatModel.name``); empty without a
    registry."""
    from appliance.core.audience import audience_of
    from finetune.registry import ModelRegistry

    out: dict[str, Audience | None] = {}
    for record in ModelRegistry(models_dir).versions():
        gguf = record.get("gguf_file") or {}
        name = f"{Path(str(gguf.get('path', ''))).name}@sha256:{str(gguf.get('sha256', ''))[:12]}"
        out[name] = audience_of(record)
    return out


def dataset_audience(folder: Path) -> list[str] | None:
    """The audience in a dataset folder's manifest; None when it has none (a dataset built
    before audiences were recorded, or a bare folder): the audience is unknown."""
    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return normalise(manifest.get("audience")) if isinstance(manifest, Mapping) else None
