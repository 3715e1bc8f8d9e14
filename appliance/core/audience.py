"""Audiences: which collections a model was trained on, and who may be answered by it.

A fine-tuned model can repeat what it was trained on, so it must be treated like the passages it
learned from. The **audience** of a dataset, and of every model version trained on it, is the
set of collections (top-level folders of the documents folder, ``""`` for the documents at its
root) that its examples drew on. A reader may be answered by a version only when they may read
every collection of its audience; the host's operators (no session: ``readable`` None) may read
everything. The base model learned nothing from the documents: its audience is empty.

A version registered before audiences were recorded has an *unknown* audience (None): it may
have learned from any collection, so it answers only the host's operators.

Which version answers a reader (``choose``): the registry's active version when they may use
it, else the newest servable version they may use (``ModelRegistry.serving_order``: gate not
failed, not left by a rollback), else the base.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

BASE = "base"
SHARED = ""
"""The collection of the documents at the root of the folder (every signed-in user reads it)."""

Audience = frozenset[str]


def collection_of(path: str) -> str:
    """A document's collection (its access collection): its top-level folder, ``""`` at the
    root. Ingestion writes it into every chunk's payload and the grants are given in it."""
    return path.split("/", 1)[0] if "/" in path else SHARED


def normalise(values: Iterable[Any] | None) -> list[str] | None:
    """An audience as stored: sorted unique collection names, or None (unknown)."""
    if values is None or isinstance(values, str | bytes):
        return None
    return sorted({str(v) for v in values})


def audience_of(record: Mapping[str, Any]) -> Audience | None:
    """A registry version's audience; the base's is empty, a version without one is unknown."""
    if record.get("version") == BASE:
        return frozenset()
    stored = normalise(record.get("audience"))
    return None if stored is None else frozenset(stored)


def may_use(audience: Audience | None, readable: Audience | None) -> bool:
    """Whether a reader of ``readable`` (None: every collection) may be answered by a model of
    ``audience`` (None: unknown, so only a reader of everything may)."""
    if readable is None:
        return True
    if audience is None:
        return False
    return audience <= readable


def readable_of(where: Mapping[str, Sequence[str]] | None) -> Audience | None:
    """The collections a reader may read, from the retrieval filter that bounds their answers
    (``Identity.where()``: None for the host's operators): the same grants bound the model."""
    if where is None:
        return None
    return frozenset(str(c) for c in where.get("collection", ()))


@dataclass(frozen=True)
class Candidate:
    """A servable version and its audience, in the registry's order of preference."""

    version: str
    audience: Audience | None


def candidates(records: Iterable[Mapping[str, Any]]) -> list[Candidate]:
    return [Candidate(str(r["version"]), audience_of(r)) for r in records]


def choose(order: Sequence[Candidate], readable: Audience | None) -> Candidate | None:
    """The first version of ``order`` the reader may be answered by."""
    return next((c for c in order if may_use(c.audience, readable)), None)


def served_by(version: str | None, name: str, audience: Audience | None) -> dict[str, Any]:
    """What an answer says about the model that wrote it (``Answer.served_by``, ``ask --json``,
    the stream's events and the audit log). ``version`` None: a model the settings name
    directly (a model server, or a GGUF other than the registry's base), outside the registry;
    ``audience`` None: unknown."""
    return {
        "version": version,
        "name": name,
        "audience": None if audience is None else sorted(audience),
    }


def describe(audience: Iterable[str] | None) -> str:
    """An audience for people: "shared documents, hr, legal"; "unknown"; "none"."""
    if audience is None:
        return "unknown (trained before audiences were recorded)"
    names = sorted(audience)
    if not names:
        return "none (learned from no documents)"
    return ", ".join("shared documents" if n == SHARED else n for n in names)
