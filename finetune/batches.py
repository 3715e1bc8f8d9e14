"""Tokenized training examples: assistant-only labels, padded batches, and the data order.

Loss is computed on assistant tokens only: every prefix of a conversation ending before an
assistant turn is rendered with the tokenizer's chat template, and the characters between that
prefix and the rendering that includes the turn (the assistant text and its end-of-turn token)
are the trained span. Templates whose renderings are not prefixes of each other are refused.

The data order is a function of (seed, step), so a checkpoint needs only its step to resume at
the same data position. The records come from a dataset folder through ``finetune.data``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.core.errors import ConfigError, ModelError
from finetune.data import PREFERENCES, TRAIN, check_messages, read_jsonl

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (torch's cross-entropy default ``ignore_index``)."""


@dataclass(frozen=True)
class Example:
    """One tokenized sequence; ``labels`` is ``IGNORE_INDEX`` where no loss is taken."""

    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _render(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, open_turn: bool) -> str:
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=open_turn
    )
    if not isinstance(text, str):
        raise ModelError("the tokenizer's chat template did not render to text")
    return text


def assistant_spans(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], *, only_last: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering of ``messages`` and the character spans the loss is taken on.

    A span runs from the end of the rendering of the turns before an assistant turn (with the
    generation prompt, i.e. the assistant header) to the end of the rendering that includes the
    turn: the assistant's text and the template's end-of-turn token (and whatever the template
    puts right after it, such as a newline).
    """
    full = _render(tokenizer, messages, open_turn=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if only_last and i != len(messages) - 1:
            continue
        prefix = _render(tokenizer, messages[:i], open_turn=True)
        through = _render(tokenizer, messages[: i + 1], open_turn=False)
        if not (through.startswith(prefix) and full.startswith(through)):
            raise ModelError(
                "the tokenizer's chat template does not render conversations as prefixes of "
                "each other (the rendering up to an assistant turn is not the start of the "
                "rendering that includes it), so assistant-only loss cannot be located; use a "
                "base model whose template is prefix-preserving (ChatML templates are)"
            )
        if len(through) > len(prefix):
            spans.append((len(prefix), len(through)))
    return full, spans


def tokenize_conversation(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    max_seq_len: int,
    *,
    only_last: bool = False,
) -> Example | None:
    """Token ids and labels of one conversation, or None when no assistant token fits.

    Too long a conversation is cut at the front: the tail of the prompt (what the answer
    responds to) and the last answer are kept. When the last answer cannot be kept whole with
    at least one token of prompt before it, the example is skipped rather than trained on an
    answer without its question.
    """
    full, spans = assistant_spans(tokenizer, messages, only_last=only_last)
    if not spans:
        return None
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoded["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in encoded["offset_mapping"]]
    labels = [IGNORE_INDEX] * len(ids)
    for index, (start, end) in enumerate(offsets):
        # A token belongs to a span when its characters start inside it (a token that straddles
        # the span start, e.g. a merged newline, stays unlabelled: it is the prompt's).
        if end > start and any(lo <= start < hi for lo, hi in spans):
            labels[index] = ids[index]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    if len(ids) > max_seq_len:
        cut = len(ids) - max_seq_len
        last_start = min(i for i, (s, _) in enumerate(offsets) if s >= spans[-1][0])
        if cut >= last_start:
            return None
        ids, labels = ids[cut:], labels[cut:]
    return Example(ids, labels)


def load_sft_examples(
    tokenizer: Any, dataset_dir: Path, max_seq_len: int
) -> tuple[list[Example], int]:
    """The tokenized ``train.jsonl`` of a dataset folder and how many records were skipped."""
    path = dataset_dir / TRAIN
    if not path.is_file():
        raise ConfigError(f"dataset folder {dataset_dir} has no {TRAIN}")
    examples: list[Example] = []
    skipped = 0
    for number, record in enumerate(read_jsonl(path), 1):
        messages = check_messages(record.get("messages"), f"{path}:{number}")
        example = tokenize_conversation(tokenizer, messages, max_seq_len)
        if example is None:
            skipped += 1
        else:
            examples.append(example)
    if not examples:
        raise ConfigError(
            f"no record of {path} fits max_seq_len={max_seq_len} with an assistant answer "
            f"({skipped} skipped); raise max_seq_len or shorten the records"
        )
    if skipped:
        log.warning(
            "%d of %d training records skipped: too long for max_seq_len=%d",
            skipped,
            skipped + len(examples),
            max_seq_len,
        )
    return examples, skipped


def load_preference_pairs(
    tokenizer: Any, dataset_dir: Path, max_seq_len: int
) -> list[tuple[Example, Example]]:
    """(chosen, rejected) examples of ``preferences.jsonl``; pairs that cannot fit are dropped."""
    path = dataset_dir / PREFERENCES
    if not path.is_file():
        return []
    pairs: list[tuple[Example, Example]] = []
    for number, record in enumerate(read_jsonl(path), 1):
        where = f"{path}:{number}"
        prompt = check_messages(record.get("prompt"), where)
        chosen, rejected = record.get("chosen"), record.get("rejected")
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise ConfigError(f"{where}: 'chosen' and 'rejected' must be texts")
        both = [
            tokenize_conversation(
                tokenizer,
                [*prompt, {"role": "assistant", "content": answer}],
                max_seq_len,
                only_last=True,
            )
            for answer in (chosen, rejected)
        ]
        if both[0] is not None and both[1] is not None:
            pairs.append((both[0], both[1]))
    return pairs


def collate(examples: Sequence[Example], pad_id: int, device: Any = "cpu") -> dict[str, Any]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
    }


def batch_indices(
    n_examples: int, seed: int, step: int, micro: int, micro_batches: int, batch_size: int
) -> list[int]:
    """Example indices of micro-batch ``micro`` of optimizer step ``step`` (1-based).

    The examples are consumed epoch after epoch, each in an order drawn from ``seed + epoch``:
    a pure function of the step, so a resumed run reads exactly what the interrupted one would.
    """
    import torch

    first = ((step - 1) * micro_batches + micro) * batch_size
    out: list[int] = []
    orders: dict[int, list[int]] = {}
    for position in range(first, first + batch_size):
        epoch, index = divmod(position, n_examples)
        if epoch not in orders:
            generator = torch.Generator().manual_seed(seed + epoch)
            orders[epoch] = torch.randperm(n_examples, generator=generator).tolist()
        out.append(orders[epoch][index])
    return out
