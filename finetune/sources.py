"""Where training examples come from; ``finetune.dataset`` builds a dataset from them.

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

Supervised records use the answering prompt exactly (``prompting.system_prompt`` and
``prompting.user_prompt`` with numbered passages), so the model learns to answer from passages
in the house style.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from appliance.core.prompting import Passage, user_prompt
from appliance.core.settings import Settings
from finetune import audience, near_duplicates
from finetune.data import ROLES, DatasetError, Example, Preference
from finetune.near_duplicates import DEFAULT_THRESHOLD, NearDuplicateIndex
from finetune.synthetic import (
    DEFAULT_LIMITS,
    FilterLimits,
    Generate,
    SourceChunk,
    generate_pairs,
)

DEFAULT_DOCS_LIMIT = 50
"""Chunks sampled for synthetic pairs when no --limit is given (about 2 s each on 2 cores)."""
_CITATION = re.compile(r"\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")
_QUESTION_LINE = "\n\nQuestion: "
_INSTRUCTION_KEYS = ("instruction", "prompt", "question")
_RESPONSE_KEYS = ("response", "answer", "output")
_CONTEXT_KEYS = ("context", "input")


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


# --- what the feedback and docs sources read -----------------------------------------------------


class SourceReader(Protocol):
    """What the ``feedback`` and ``docs`` sources read, handed in by the application layer
    (``appliance.commands.dataset.ApplianceSources``: the conversations, the appliance's chunk
    sample and the configured chat model), so this package opens no store of another layer."""

    def feedback(self) -> list[dict[str, Any]]:
        """Every rated answer (``ConversationStore.feedback()`` rows)."""
        ...

    def chunks(
        self, limit: int, seed: int, collections: frozenset[str] | None
    ) -> tuple[list[SourceChunk], str]:
        """A seeded sample of indexed chunks (of ``collections`` only, when given) and where
        it was read ("service" or "local"); ``DatasetError`` when nothing is indexed."""
        ...

    def generator(self, seed: int) -> AbstractContextManager[tuple[Generate, str]]:
        """The configured chat model as a ``Generate`` and its name (closed on exit)."""
        ...


def _reader(reader: SourceReader | None, spec: str) -> SourceReader:
    if reader is None:
        raise DatasetError(
            f"--from {spec} reads the appliance's data: the caller must hand in a SourceReader"
        )
    return reader


# --- source: the documents ----------------------------------------------------------------------


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


# --- all sources of a build ---------------------------------------------------------------------


@dataclass
class Collected:
    examples: list[Example] = field(default_factory=list)
    preferences: list[Preference] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    sources: list[dict[str, Any]] = field(default_factory=list)


def collect(
    settings: Settings,
    sources: Sequence[str],
    system: str,
    *,
    reader: SourceReader | None,
    seed: int,
    limit: int | None,
    generate: Generate | None,
    limits: FilterLimits,
    collections: frozenset[str] | None = None,
) -> Collected:
    out = Collected()
    for spec in dict.fromkeys(sources):  # a source named twice is read once
        if spec == "feedback":
            rows = _reader(reader, spec).feedback()
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
            chunks, origin = _reader(reader, spec).chunks(wanted, seed, collections)
            if generate is not None:
                examples, rejected = synthetic_examples(chunks, generate, system, limits)
                model = "injected"
            else:
                with _reader(reader, spec).generator(seed) as (real, model):
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
