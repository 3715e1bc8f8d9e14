"""Building a training dataset: the examples of the sources (``finetune.sources``) are
deduplicated, filtered against the evaluation golden set, split and written as one versioned
folder in the format of ``finetune.data``.

Examples that overlap the evaluation golden set (the same normalized or a near-duplicate
question, or the same answer) are dropped, so the gate is not fooled by leakage. A folder is
written under a temporary name and renamed, so it is complete or absent.

``--collections A,B`` (``collections=``) keeps only records whose collections are all among
those: documents are sampled from them alone, and other records are counted as
``outside_collections`` (``finetune.audience``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.core.evaluation import GoldenItem, load_golden
from appliance.core.prompting import system_prompt
from appliance.core.settings import Settings
from finetune import audience, near_duplicates
from finetune.data import (
    FORMAT,
    HELDOUT,
    MANIFEST,
    PREFERENCES,
    TRAIN,
    DatasetError,
    DatasetInfo,
    Example,
    content_digest,
    jsonl_bytes,
    load_dataset,
    validate_name,
)
from finetune.near_duplicates import NearDuplicateIndex
from finetune.sources import SourceReader, collect, strip_citations
from finetune.synthetic import DEFAULT_LIMITS, FilterLimits, Generate

log = logging.getLogger(__name__)

GOLDEN_THRESHOLD = 0.5
"""Questions this similar to a golden question are dropped: stricter than the deduplication
threshold, since a leaked evaluation question costs more than a lost training example."""

# --- golden overlap -----------------------------------------------------------------------------


class GoldenFilter:
    """Recognises examples that overlap the evaluation golden set."""

    def __init__(self, items: Sequence[GoldenItem], threshold: float = GOLDEN_THRESHOLD) -> None:
        self._questions = {near_duplicates.key(i.question) for i in items}
        self._answers = {near_duplicates.key(strip_citations(i.answer)) for i in items} - {""}
        self._similar = NearDuplicateIndex(threshold)
        for item in items:
            self._similar.add(item.question, item.id)

    def overlaps(self, question: str, answer: str) -> bool:
        return (
            near_duplicates.key(question) in self._questions
            or self._similar.match(question) is not None
            or near_duplicates.key(strip_citations(answer)) in self._answers
        )


def split_heldout(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, heldout): ``round(n * fraction)`` examples held out, at least 1 when there are 2
    or more and the fraction is not 0, shared among sources in proportion to their size
    (largest remainder), drawn with the seed. Both lists are sorted by id."""
    ordered = sorted(examples, key=lambda e: e.id)
    n = len(ordered)
    k = 0 if n < 2 or fraction <= 0 else min(n - 1, max(1, round(n * fraction)))
    by_source: dict[str, list[Example]] = {}
    for example in ordered:
        by_source.setdefault(example.source, []).append(example)
    quotas = {s: int(k * len(g) / n) for s, g in by_source.items()} if n else {}
    remainders = sorted(by_source, key=lambda s: (-(k * len(by_source[s]) / n - quotas[s]), s))
    for source in remainders[: k - sum(quotas.values())]:
        quotas[source] += 1
    rng = random.Random(seed)
    held: set[str] = set()
    for source in sorted(by_source):
        group = list(by_source[source])
        rng.shuffle(group)
        held.update(e.id for e in group[: quotas[source]])
    return [e for e in ordered if e.id not in held], [e for e in ordered if e.id in held]


def _default_name(settings: Settings) -> str:
    base = time.strftime("dataset-%Y%m%d-%H%M%S")
    name, n = base, 1
    while (settings.datasets_dir / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


# --- the build ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Prepared:
    """A dataset's content, ready to be written under a name."""

    files: dict[str, bytes]
    sha256: str
    manifest: dict[str, Any]
    """Every manifest field except the name and the creation time."""
    golden_path: Path | None


def _prepare(
    settings: Settings,
    sources: Sequence[str],
    *,
    seed: int,
    limit: int | None,
    golden: Path | None,
    generate: Generate | None,
    limits: FilterLimits,
    golden_threshold: float,
    collections: frozenset[str] | None = None,
    reader: SourceReader | None = None,
) -> _Prepared:
    if not sources:
        raise DatasetError("give at least one source: --from feedback, docs or a FILE")
    if limit is not None and limit < 1:
        raise DatasetError(f"--limit must be at least 1, not {limit}")
    golden_path = golden or settings.finetune.golden_path
    golden_filter = (
        GoldenFilter(load_golden(golden_path), golden_threshold) if golden_path else None
    )
    system = system_prompt(settings.answer.system_prompt)
    if collections is not None:
        audience.check_known(collections, settings.ingest.docs_dir)
    collected = collect(
        settings,
        sources,
        system,
        reader=reader,
        seed=seed,
        limit=limit,
        generate=generate,
        limits=limits,
        collections=collections,
    )

    unique: dict[str, Example] = {}
    rejected = collected.rejected
    for example in collected.examples:
        if example.id in unique:
            rejected["duplicate"] += 1
        else:
            unique[example.id] = example
    examples = list(unique.values())
    preferences = collected.preferences
    dropped = 0
    if golden_filter is not None:
        kept = [e for e in examples if not golden_filter.overlaps(e.question, e.answer)]
        kept_prefs = [
            p
            for p in preferences
            if not golden_filter.overlaps(p.question, p.chosen)
            and not golden_filter.overlaps(p.question, p.rejected)
        ]
        dropped = len(examples) - len(kept) + len(preferences) - len(kept_prefs)
        examples, preferences = kept, kept_prefs
    train, heldout = split_heldout(examples, settings.finetune.heldout_fraction, seed)
    preferences = sorted(preferences, key=lambda p: p.id)
    files = {
        TRAIN: jsonl_bytes(e.as_json() for e in train),
        HELDOUT: jsonl_bytes(e.as_json() for e in heldout),
        PREFERENCES: jsonl_bytes(p.as_json() for p in preferences),
    }
    sha256 = content_digest(files)
    manifest = {
        "sources": collected.sources,
        "counts_by_source": dict(sorted(Counter(e.source for e in examples).items())),
        "rejected": dict(sorted(rejected.items())),
        "dropped_for_golden_overlap": dropped,
        "audience": audience.union(
            [*(e.collections for e in examples), *(p.collections for p in preferences)]
        ),
        "feedback_users": sorted(
            {u for e in examples if (u := e.user)}
            | {u for p in preferences for u in (p.user, p.rejected_by) if u}
        ),
        "split": {
            "train": len(train),
            "heldout": len(heldout),
            "preferences": len(preferences),
        },
        "settings": {
            "seed": seed,
            "limit": limit,
            "collections": None if collections is None else sorted(collections),
            "heldout_fraction": settings.finetune.heldout_fraction,
            "golden_path": str(golden_path) if golden_path else None,
            "golden_threshold": golden_threshold,
            "filters": {
                "min_chunk_words": limits.min_chunk_words,
                "question_words": [limits.min_question_words, limits.max_question_words],
                "answer_words": [limits.min_answer_words, limits.max_answer_words],
                "min_containment": limits.min_containment,
                "near_duplicate_threshold": limits.near_duplicate_threshold,
            },
            "system_prompt_sha256": hashlib.sha256(system.encode()).hexdigest(),
        },
        "files": {"train": TRAIN, "heldout": HELDOUT, "preferences": PREFERENCES},
    }
    return _Prepared(files, sha256, manifest, golden_path)


def _write(settings: Settings, name: str, prepared: _Prepared) -> DatasetInfo:
    final = settings.datasets_dir / name
    settings.datasets_dir.mkdir(parents=True, exist_ok=True)
    tmp = settings.datasets_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for file_name, data in prepared.files.items():
            (tmp / file_name).write_bytes(data)
        manifest = {
            "format": FORMAT,
            "name": name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "sha256": prepared.sha256,
            **prepared.manifest,
        }
        (tmp / MANIFEST).write_text(
            json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        os.rename(tmp, final)  # atomic; refuses a folder that appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if prepared.golden_path is None:
        log.warning("no golden set configured (finetune.golden_path): leakage was not checked")
    return load_dataset(final)


def build_dataset(
    settings: Settings,
    sources: Sequence[str],
    name: str | None = None,
    *,
    seed: int = 0,
    limit: int | None = None,
    golden: Path | None = None,
    generate: Generate | None = None,
    limits: FilterLimits = DEFAULT_LIMITS,
    golden_threshold: float = GOLDEN_THRESHOLD,
    collections: Iterable[str] | None = None,
    reader: SourceReader | None = None,
) -> DatasetInfo:
    """Build ``settings.datasets_dir/NAME`` from ``sources`` ("feedback", "docs" or a file
    path; several combine). ``limit`` caps each source (chunks sampled, for docs);
    ``golden`` overrides ``settings.finetune.golden_path``; ``generate`` replaces the
    configured chat model for synthetic pairs; ``collections`` keeps only records drawn
    from those collections (``""`` the documents at the root). ``reader`` reads the
    feedback and the chunks and builds the chat model (``appliance.commands.dataset``
    hands one in); a file alone needs none."""
    name = validate_name(name) if name is not None else _default_name(settings)
    final = settings.datasets_dir / name
    if final.exists():
        raise DatasetError(
            f"dataset {name!r} exists already ({final}); datasets are immutable, so that runs "
            "can cite them by hash: choose another --out"
        )
    prepared = _prepare(
        settings,
        sources,
        seed=seed,
        limit=limit,
        golden=golden,
        generate=generate,
        limits=limits,
        golden_threshold=golden_threshold,
        collections=None if collections is None else frozenset(collections),
        reader=reader,
    )
    return _write(settings, name, prepared)


# --- a training file given where a dataset is expected ------------------------------------------

MAX_SUFFIX = 99


def name_for_file(path: Path) -> str:
    """A dataset name from a file's name: its stem with what names may not hold replaced."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(path).stem).strip(".-_")
    stem = re.sub(r"\.{2,}", ".", stem)[:72].rstrip(".-_")  # room for a "-NN" suffix
    return stem or "dataset"


@dataclass(frozen=True)
class FileDataset:
    """What ``dataset_from_file`` did: ``action`` is "built" or "reused"; ``taken`` lists the
    names that were in use by datasets with other content (so a suffixed name was used)."""

    info: DatasetInfo
    action: str
    source: Path
    taken: tuple[str, ...] = ()

    def message(self) -> str:
        info = self.info
        counts = f"train {info.train}, heldout {info.heldout}, sha256 {info.sha256[:12]}"
        if self.action == "reused":
            return (
                f"dataset {info.name!r} already holds exactly what {self.source.name} builds "
                f"({counts}): reusing it"
            )
        clash = (
            f"; {', '.join(repr(t) for t in self.taken)} exists with other content, so the "
            f"new one is {info.name!r}"
            if self.taken
            else ""
        )
        return f"built dataset {info.name!r} from {self.source} ({counts}){clash}"

    def summary(self) -> dict[str, Any]:
        return {
            **self.info.summary(),
            "action": self.action,
            "from": str(self.source),
            "names_taken": list(self.taken),
        }


def dataset_from_file(settings: Settings, path: Path, *, seed: int = 0) -> FileDataset:
    """A dataset named after ``path``, built as ``dataset build --from FILE`` builds it.

    When the name is taken, a dataset with the same content hash is reused (the same file,
    split and golden filter), and one with other content is left alone: the new dataset gets
    the first free ``NAME-2``, ``NAME-3``, ... (datasets are immutable, so a name is never
    overwritten).
    """
    path = Path(path)
    prepared = _prepare(
        settings,
        [str(path)],
        seed=seed,
        limit=None,
        golden=None,
        generate=None,
        limits=DEFAULT_LIMITS,
        golden_threshold=GOLDEN_THRESHOLD,
    )
    stem = name_for_file(path)
    taken: list[str] = []
    for n in range(1, MAX_SUFFIX + 1):
        name = stem if n == 1 else f"{stem}-{n}"
        folder = settings.datasets_dir / name
        if not folder.exists():
            return FileDataset(_write(settings, name, prepared), "built", path, tuple(taken))
        try:
            existing = load_dataset(folder)
        except DatasetError:
            existing = None  # an edited or broken dataset is never reused
        if existing is not None and existing.sha256 == prepared.sha256:
            return FileDataset(existing, "reused", path, tuple(taken))
        taken.append(name)
    raise DatasetError(
        f"datasets {stem!r} to {stem}-{MAX_SUFFIX} all exist with other content; build one "
        f"with `appliance dataset build --from {path} --out NAME`"
    )
