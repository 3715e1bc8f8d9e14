"""Training datasets for fine-tuning, built from three sources into one versioned folder.

    --from FILE      admin-provided pairs: JSONL of {"messages": [...]} or
                     {"instruction"|"prompt"|"question", "response"|"answer"|"output",
                     optional "context"|"input"}, each optionally with "collections": [...]
                     (the collections its text comes from); a malformed line fails the
                     build, by number
    --from feedback  thumbs-up answers with the passages they cited (stored with the feedback),
                     in the answering prompt format; thumbs-up and thumbs-down answers to the
                     same question become preference pairs
    --from docs      synthetic question-answer pairs the local chat model writes from sampled
                     indexed chunks (``finetune.synthetic``), filtered

    DATA/datasets/NAME/
        train.jsonl        {"messages": [...], "source": "file"|"feedback"|"docs", "id",
                            "collections": [...], "user": the feedback's author or null}
        heldout.jsonl      the same, kept out of training (stratified by source, seeded)
        preferences.jsonl  {"prompt": [messages], "chosen": str, "rejected": str, "id",
                            "collections": [...], "user", "rejected_by"}
        manifest.json      sources and counts, rejections by reason, the golden-overlap drop,
                           split sizes, the settings used, the audience (every collection
                           the records drew on) and the sha256 of the content

``--collections A,B`` (``collections=``) keeps only records whose collections are all among
those: documents are sampled from them alone, and other records are counted as
``outside_collections`` (``finetune.audience``).

Supervised records use the answering prompt exactly (``prompting.system_prompt`` and
``prompting.user_prompt`` with numbered passages), so the model learns to answer from passages
in the house style. Examples that overlap the evaluation golden set (the same normalized or a
near-duplicate question, or the same answer) are dropped, so the gate is not fooled by leakage.
A folder is written under a temporary name and renamed, so it is complete or absent.
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from appliance.audience import normalise as normalise_audience
from appliance.errors import ApplianceError
from appliance.evaluation import GoldenItem, load_golden
from appliance.prompting import Passage, system_prompt, user_prompt
from appliance.settings import Settings
from finetune import audience, near_duplicates
from finetune.near_duplicates import DEFAULT_THRESHOLD, NearDuplicateIndex
from finetune.synthetic import (
    DEFAULT_LIMITS,
    FilterLimits,
    Generate,
    SourceChunk,
    generate_pairs,
    model_generator,
    sample_chunks,
)

log = logging.getLogger(__name__)

FORMAT = 1
TRAIN, HELDOUT, PREFERENCES, MANIFEST = (
    "train.jsonl",
    "heldout.jsonl",
    "preferences.jsonl",
    "manifest.json",
)
CONTENT_FILES = (TRAIN, HELDOUT, PREFERENCES)
DEFAULT_DOCS_LIMIT = 50
"""Chunks sampled for synthetic pairs when no --limit is given (about 2 s each on 2 cores)."""
GOLDEN_THRESHOLD = 0.5
"""Questions this similar to a golden question are dropped: stricter than the deduplication
threshold, since a leaked evaluation question costs more than a lost training example."""
ROLES = ("system", "user", "assistant")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
_CITATION = re.compile(r"\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")
_QUESTION_LINE = "\n\nQuestion: "
_INSTRUCTION_KEYS = ("instruction", "prompt", "question")
_RESPONSE_KEYS = ("response", "answer", "output")
_CONTEXT_KEYS = ("context", "input")


class DatasetError(ApplianceError):
    """A dataset could not be built or read (a bad input line, a bad name, a changed file)."""


# --- records ------------------------------------------------------------------------------------


def _canonical(record: Mapping[str, Any]) -> str:
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
        digest = hashlib.sha256(_canonical({"m": self.messages}).encode()).hexdigest()
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
        return "pref-" + hashlib.sha256(_canonical(record).encode()).hexdigest()[:16]

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


def question_of(user_content: str) -> str:
    """The question inside a user turn: after "Question: " in the answering prompt format,
    else the whole turn."""
    if user_content.startswith("Context:") and _QUESTION_LINE in user_content:
        return user_content.rsplit(_QUESTION_LINE, 1)[1].strip()
    return user_content.strip()


def strip_citations(text: str) -> str:
    return re.sub(r"\s+([.,;:!?])", r"\1", _CITATION.sub("", text)).strip()


def _passage(number: int, text: str, path: str = "", **where: Any) -> Passage:
    return Passage(
        number=number,
        path=path,
        page=where.get("page"),
        heading=where.get("heading"),
        text=text,
        score=float(where.get("score") or 0.0),
        start=int(where.get("start") or 0),
        end=int(where.get("end") or len(text)),
        doc_hash=str(where.get("doc_hash") or ""),
        chunk_ids=tuple(where.get("chunk_ids") or ()),
    )


def grounded_messages(
    system: str, question: str, passages: Sequence[Passage], answer: str
) -> tuple[tuple[str, str], ...]:
    """A training conversation in the answering prompt format."""
    return (
        ("system", system),
        ("user", user_prompt(question, passages)),
        ("assistant", answer),
    )


# --- source: an admin's file --------------------------------------------------------------------


def _first(record: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        if key in record:
            return record[key]
    return None


def _messages_of(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("'messages' must be a non-empty list")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"message {i} has no text content")
        out.append((str(role), content))
    if out[-1][0] != "assistant":
        raise ValueError("the last message must be the assistant's answer")
    if not any(role == "user" for role, _ in out):
        raise ValueError("there is no user message")
    return tuple(out)


def _file_example(record: Any, system: str) -> Example:
    if not isinstance(record, dict):
        raise ValueError("the line is not a JSON object")
    collections = audience.of_record(record.get("collections"))
    if "messages" in record:
        messages = _messages_of(record["messages"])
        user = next(c for r, c in reversed(messages) if r == "user")
        return Example(messages, "file", question_of(user), messages[-1][1], collections)
    instruction = _first(record, _INSTRUCTION_KEYS)
    response = _first(record, _RESPONSE_KEYS)
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("no 'messages', and no text 'instruction', 'prompt' or 'question'")
    if not isinstance(response, str) or not response.strip():
        raise ValueError("no text 'response', 'answer' or 'output'")
    context = _first(record, _CONTEXT_KEYS)
    if context is not None and not isinstance(context, str):
        raise ValueError("'context' must be text")
    if context and context.strip():
        messages = grounded_messages(system, instruction, [_passage(1, context)], response)
    else:
        # no passage to quote: the instruction is the whole user turn
        messages = (("system", system), ("user", instruction.strip()), ("assistant", response))
    return Example(messages, "file", instruction.strip(), response, collections)


def read_instruction_file(path: Path, system: str) -> list[Example]:
    """The examples of an admin's JSONL file; every malformed line is reported by number."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DatasetError(f"cannot read the training file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise DatasetError(f"the training file {path} is not UTF-8 text") from exc
    examples: list[Example] = []
    problems: list[str] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            examples.append(_file_example(json.loads(line), system))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            problems.append(f"line {n}: {exc}")
    if problems:
        shown = "; ".join(problems[:10]) + (
            f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        )
        raise DatasetError(
            f"{path}: {len(problems)} malformed line(s): {shown}. Each line must be "
            '{"messages": [...]} or {"instruction": ..., "response": ..., "context": ...}'
        )
    if not examples:
        raise DatasetError(f"the training file {path} holds no examples")
    return examples


# --- source: feedback ---------------------------------------------------------------------------


def _renumber(answer: str, mapping: Mapping[int, int]) -> str:
    """Citation markers mapped to the new passage numbers; markers of passages that are not
    in the prompt are removed."""

    def swap(match: re.Match[str]) -> str:
        numbers = [mapping.get(int(n)) for n in re.split(r"\s*,\s*", match.group(1))]
        kept = sorted({n for n in numbers if n is not None})
        return "[" + ", ".join(str(n) for n in kept) + "]" if kept else ""

    text = _CITATION.sub(swap, answer)
    text = re.sub(r"[ \t]+([.,;:!?])", r"\1", text)
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def feedback_passages(sources: Sequence[Mapping[str, Any]]) -> tuple[list[Passage], dict[int, int]]:
    """The cited passages of an answer as stored with its feedback, renumbered 1..n in their
    original order, and the map from old to new numbers. Feedback keeps each source's text, so
    the passages need neither the index nor a new retrieval."""
    usable: dict[int, Mapping[str, Any]] = {}
    for source in sources:
        try:
            number = int(source.get("number", 0))
        except (TypeError, ValueError):
            continue
        if number > 0 and str(source.get("text") or "").strip() and number not in usable:
            usable[number] = source
    mapping = {old: new for new, old in enumerate(sorted(usable), 1)}
    passages = [
        _passage(
            mapping[old],
            str(usable[old]["text"]),
            str(usable[old].get("path") or ""),
            page=usable[old].get("page"),
            heading=usable[old].get("heading"),
            score=usable[old].get("score"),
            start=usable[old].get("start"),
            end=usable[old].get("end"),
            doc_hash=usable[old].get("doc_hash"),
        )
        for old in sorted(usable)
    ]
    return passages, mapping


def _text_key(text: str) -> str:
    return near_duplicates.key(text)


ModelAudiences = Mapping[str, "frozenset[str] | None"]
"""Registered versions' audiences by model name (``finetune.audience.model_audiences``)."""


def feedback_collections(
    row: Mapping[str, Any], passages: Sequence[Passage], models: ModelAudiences
) -> tuple[str, ...] | None:
    """An answer's collections: its passages', and the audience of the registered version that
    wrote it (a fine-tune can repeat what it learned); None when that audience is unknown. A
    model outside the registry (a model server) adds nothing."""
    own = set(audience.of_paths(p.path for p in passages))
    model = models.get(str(row.get("model") or ""), frozenset())
    if model is None:
        return None
    return tuple(sorted(own | model))


def feedback_examples(
    rows: Iterable[Mapping[str, Any]], system: str, models: ModelAudiences | None = None
) -> tuple[list[Example], Counter[str]]:
    """Supervised examples from thumbs-up answers; answers with no cited passage text (an
    abstention, say) are counted as ``feedback_no_context`` and left out, since the record must
    teach answering from passages. ``models``: registered versions' audiences by name; an
    answer by a version of unknown audience is counted as ``model_audience_unknown``."""
    examples: list[Example] = []
    rejected: Counter[str] = Counter()
    for row in rows:
        if row.get("rating") != "up":
            continue
        passages, mapping = feedback_passages(row.get("sources") or [])
        if not passages:
            rejected["feedback_no_context"] += 1
            continue
        collections = feedback_collections(row, passages, models or {})
        if collections is None:
            rejected["model_audience_unknown"] += 1
            continue
        question, answer = str(row["question"]).strip(), _renumber(str(row["answer"]), mapping)
        if not question or not answer:
            rejected["feedback_empty"] += 1
            continue
        messages = grounded_messages(system, question, passages, answer)
        user = str(row["user"]) if row.get("user") else None
        examples.append(Example(messages, "feedback", question, answer, collections, user))
    return examples, rejected


def preference_pairs(
    rows: Sequence[Mapping[str, Any]],
    system: str,
    threshold: float = DEFAULT_THRESHOLD,
    models: ModelAudiences | None = None,
) -> list[Preference]:
    """Thumbs-up against thumbs-down answers to the same question (the same normalized text,
    or a near-duplicate). The prompt is the approved answer's, with its passages; the rejected
    answer's citations are mapped onto those passages by text, or removed."""
    groups: list[list[Mapping[str, Any]]] = []
    index = NearDuplicateIndex(threshold)
    exact: dict[str, int] = {}
    for row in rows:
        if row.get("rating") not in ("up", "down"):
            continue
        key = _text_key(str(row["question"]))
        if not key:
            continue
        group = exact.get(key)
        if group is None:
            similar = index.match(str(row["question"]))
            group = int(similar) if similar is not None else None
        if group is None:
            group = len(groups)
            groups.append([])
            index.add(str(row["question"]), str(group))
        exact[key] = group
        groups[group].append(row)
    pairs: dict[str, Preference] = {}
    for group_rows in groups:
        ups = [r for r in group_rows if r["rating"] == "up"]
        downs = [r for r in group_rows if r["rating"] == "down"]
        for up in ups:
            passages, mapping = feedback_passages(up.get("sources") or [])
            if not passages:
                continue
            question = str(up["question"]).strip()
            chosen = _renumber(str(up["answer"]), mapping)
            up_collections = feedback_collections(up, passages, models or {})
            if up_collections is None:
                continue
            by_text = {p.text.strip(): p.number for p in passages}
            for down in downs:
                down_passages, _ = feedback_passages(down.get("sources") or [])
                down_collections = feedback_collections(down, down_passages, models or {})
                if down_collections is None:
                    continue
                down_map = {
                    int(s["number"]): by_text[str(s.get("text") or "").strip()]
                    for s in down.get("sources") or []
                    if str(s.get("text") or "").strip() in by_text and s.get("number")
                }
                rejected = _renumber(str(down["answer"]), down_map)
                if _text_key(strip_citations(chosen)) == _text_key(strip_citations(rejected)):
                    continue  # the same answer rated both ways: no preference to learn
                prompt = grounded_messages(system, question, passages, "")[:2]
                pair = Preference(
                    prompt,
                    chosen,
                    rejected,
                    question,
                    tuple(sorted({*up_collections, *down_collections})),
                    str(up["user"]) if up.get("user") else None,
                    str(down["user"]) if down.get("user") else None,
                )
                pairs.setdefault(pair.id, pair)
    return list(pairs.values())


def read_feedback(settings: Settings) -> list[dict[str, Any]]:
    """Every rated answer. SQLite lets this read beside a running core service."""
    from appliance.conversations import ConversationStore

    if not settings.conversations_path.exists():
        return []
    store = ConversationStore(settings.conversations_path)
    try:
        return store.feedback()
    finally:
        store.close()


# --- source: the documents ----------------------------------------------------------------------


def read_chunks(
    settings: Settings, limit: int, seed: int, collections: frozenset[str] | None = None
) -> tuple[list[SourceChunk], str]:
    """A seeded sample of indexed chunks (of ``collections`` only, when given) and where it was
    read: from the running core service (the index's one owner) when there is one, else from
    the ingestion state under the data folder's ownership lock. The state keeps every chunk's
    text, so neither the store nor the embedding model is opened."""
    from appliance.api import ServiceClient

    client = ServiceClient.find(settings.data_dir)
    if client is not None:
        body: dict[str, Any] = {"limit": limit, "seed": seed}
        if collections is not None:
            body["collections"] = sorted(collections)
        rows = client.call("POST", "/admin/chunks", body)
        return [SourceChunk.from_json(r) for r in rows], "service"
    if not settings.state_path.exists():
        raise DatasetError(
            f"nothing is indexed in {settings.data_dir}: run `appliance ingest FOLDER` first"
        )
    from appliance.ownership import DataDirLock
    from appliance.wiring import ACTIVE_COLLECTION
    from ingest.state import IngestState

    with DataDirLock(settings.data_dir, "appliance dataset build"):
        state = IngestState(settings.state_path)
        try:
            collection = state.get_meta(ACTIVE_COLLECTION) or ""
            chunks = sample_chunks(state, collection, limit, seed, readable=collections)
            return chunks, "local"
        finally:
            state.close()


def synthetic_examples(
    chunks: Sequence[SourceChunk],
    generate: Generate,
    system: str,
    limits: FilterLimits = DEFAULT_LIMITS,
) -> tuple[list[Example], Counter[str]]:
    """Filtered synthetic pairs as answering-format examples over their one passage; the
    answer cites it as [1], as answers do."""
    result = generate_pairs(chunks, generate, limits=limits)
    examples = []
    for pair in result.pairs:
        passage = _passage(1, pair.chunk.text, pair.chunk.file, chunk_ids=(pair.chunk.chunk_id,))
        answer = pair.answer.rstrip(" .") + " [1]."
        messages = grounded_messages(system, pair.question, [passage], answer)
        collections = audience.of_paths([pair.chunk.file])
        examples.append(Example(messages, "docs", pair.question, answer, collections))
    return examples, result.rejected


# --- golden overlap -----------------------------------------------------------------------------


class GoldenFilter:
    """Recognises examples that overlap the evaluation golden set."""

    def __init__(self, items: Sequence[GoldenItem], threshold: float = GOLDEN_THRESHOLD) -> None:
        self._questions = {_text_key(i.question) for i in items}
        self._answers = {_text_key(strip_citations(i.answer)) for i in items} - {""}
        self._similar = NearDuplicateIndex(threshold)
        for item in items:
            self._similar.add(item.question, item.id)

    def overlaps(self, question: str, answer: str) -> bool:
        return (
            _text_key(question) in self._questions
            or self._similar.match(question) is not None
            or _text_key(strip_citations(answer)) in self._answers
        )


# --- split, hash, folder ------------------------------------------------------------------------


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


def _jsonl(records: Iterable[Mapping[str, Any]]) -> bytes:
    return "".join(_canonical(r) + "\n" for r in records).encode("utf-8")


def _content_digest(files: Mapping[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in CONTENT_FILES:
        data = files[name]
        digest.update(f"{name}\n{len(data)}\n".encode())
        digest.update(data)
    return digest.hexdigest()


def content_sha256(folder: Path) -> str:
    """The hash of a dataset's content: each content file's name and bytes, in a fixed order
    (the files are written canonically, so equal content gives equal bytes)."""
    return _content_digest({name: (folder / name).read_bytes() for name in CONTENT_FILES})


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


def _default_name(settings: Settings) -> str:
    base = time.strftime("dataset-%Y%m%d-%H%M%S")
    name, n = base, 1
    while (settings.datasets_dir / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


# --- the build ----------------------------------------------------------------------------------


@dataclass
class _Collected:
    examples: list[Example] = field(default_factory=list)
    preferences: list[Preference] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    sources: list[dict[str, Any]] = field(default_factory=list)


def _collect(
    settings: Settings,
    sources: Sequence[str],
    system: str,
    *,
    seed: int,
    limit: int | None,
    generate: Generate | None,
    limits: FilterLimits,
    collections: frozenset[str] | None = None,
) -> _Collected:
    out = _Collected()
    for spec in dict.fromkeys(sources):  # a source named twice is read once
        if spec == "feedback":
            rows = read_feedback(settings)
            models = audience.model_audiences(settings.models_dir) if rows else {}
            examples, rejected = feedback_examples(rows, system, models)
            prefs = preference_pairs(rows, system, limits.near_duplicate_threshold, models)
            examples, prefs = (
                _inside(examples, collections, rejected),
                _inside(prefs, collections, rejected),
            )
            examples, prefs = examples[:limit], prefs[:limit]
            out.rejected.update(rejected)
            out.preferences.extend(prefs)
            out.examples.extend(examples)
            out.sources.append(
                {
                    "source": "feedback",
                    "rated_answers": len(rows),
                    "examples": len(examples),
                    "preferences": len(prefs),
                    "context": "passages stored with the feedback (no re-retrieval)",
                }
            )
        elif spec == "docs":
            wanted = limit or DEFAULT_DOCS_LIMIT
            chunks, origin = read_chunks(settings, wanted, seed, collections)
            if generate is not None:
                examples, rejected = synthetic_examples(chunks, generate, system, limits)
                model = "injected"
            else:
                with model_generator(settings.chat, seed=seed) as (real, model):
                    examples, rejected = synthetic_examples(chunks, real, system, limits)
            out.rejected.update(rejected)
            out.examples.extend(examples)
            out.sources.append(
                {
                    "source": "docs",
                    "chunks_sampled": len(chunks),
                    "chunks_read_from": origin,
                    "model": model,
                    "examples": len(examples),
                }
            )
        else:
            path = Path(spec)
            if not path.is_file():
                raise DatasetError(
                    f"--from {spec!r} is neither 'feedback', 'docs' nor an existing file"
                )
            examples = _inside(read_instruction_file(path, system), collections, out.rejected)
            examples = examples[:limit]
            out.examples.extend(examples)
            out.sources.append(
                {"source": "file", "path": str(path.resolve()), "examples": len(examples)}
            )
    return out


_Record = TypeVar("_Record", "Example", "Preference")


def _inside(
    records: list[_Record], allowed: frozenset[str] | None, rejected: Counter[str]
) -> list[_Record]:
    """The records whose collections are all ``allowed`` (None: all); the others counted."""
    kept = [r for r in records if audience.within(r.collections, allowed)]
    rejected["outside_collections"] += len(records) - len(kept)
    if not rejected["outside_collections"]:
        del rejected["outside_collections"]
    return kept


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
    collected = _collect(
        settings,
        sources,
        system,
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
        TRAIN: _jsonl(e.as_json() for e in train),
        HELDOUT: _jsonl(e.as_json() for e in heldout),
        PREFERENCES: _jsonl(p.as_json() for p in preferences),
    }
    sha256 = _content_digest(files)
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
) -> DatasetInfo:
    """Build ``settings.datasets_dir/NAME`` from ``sources`` ("feedback", "docs" or a file
    path; several combine). ``limit`` caps each source (chunks sampled, for docs);
    ``golden`` overrides ``settings.finetune.golden_path``; ``generate`` replaces the
    configured chat model for synthetic pairs; ``collections`` keeps only records drawn
    from those collections (``""`` the documents at the root)."""
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
