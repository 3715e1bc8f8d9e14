"""``appliance dataset build|list|show``: training datasets for fine-tuning (``finetune.dataset``).

Heavy work (the chat model, for ``--from docs``) is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.core.settings import Settings

if TYPE_CHECKING:
    from finetune.synthetic import Generate, SourceChunk


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


class ApplianceSources:
    """What ``--from feedback`` and ``--from docs`` read (``finetune.sources.SourceReader``),
    from this layer, which may open them: the rated answers from the conversations (SQLite
    reads beside a running service), the chunk sample through the data folder's appliance
    (``wiring.connect``: the running service when one answers, else the ingestion state under
    the folder's lock) and the configured chat model."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def feedback(self) -> list[dict[str, Any]]:
        from appliance.conversations import ConversationStore

        if not self.settings.conversations_path.exists():
            return []
        store = ConversationStore(self.settings.conversations_path)
        try:
            return store.feedback()
        finally:
            store.close()

    def chunks(
        self, limit: int, seed: int, collections: frozenset[str] | None
    ) -> tuple[list[SourceChunk], str]:
        """The state keeps every chunk's text, so neither the store nor the embedding model
        is opened."""
        from appliance.wiring import connect
        from finetune.data import DatasetError
        from finetune.synthetic import SourceChunk

        with connect(self.settings, role="appliance dataset build") as appliance:
            if appliance.kind == "local" and not self.settings.state_path.exists():
                raise DatasetError(
                    f"nothing is indexed in {self.settings.data_dir}: "
                    "run `appliance ingest FOLDER` first"
                )
            rows = appliance.chunks(limit, seed, collections)
            origin = "service" if appliance.kind == "remote" else "local"
        return [SourceChunk.from_json(dict(r)) for r in rows], origin

    @contextmanager
    def generator(self, seed: int) -> Iterator[tuple[Generate, str]]:
        from appliance.chat.factory import build_chat_model
        from finetune.synthetic import model_generator

        with model_generator(build_chat_model(self.settings.chat), seed=seed) as made:
            yield made


def cmd_build(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.audience import parse_collections
    from finetune.dataset import build_dataset

    info = build_dataset(
        settings,
        args.sources,
        args.out,
        seed=args.seed,
        limit=args.limit,
        golden=Path(args.golden) if args.golden else None,
        collections=parse_collections(args.collections),
        reader=ApplianceSources(settings),
    )
    if args.json:
        _print_json(info.summary())
        return 0
    print(
        f"dataset {info.name}: train {info.train}, heldout {info.heldout}, "
        f"preferences {info.preferences}  (sha256 {info.sha256[:12]})"
    )
    print(f"  examples by source: {_counts(info.sources)}")
    print(f"  rejected: {_counts(info.rejected)}")
    print(f"  dropped for golden overlap: {info.dropped_for_golden_overlap}")
    print(f"  audience (collections it draws on): {describe(info.audience)}")
    print(f"  in {info.path}")
    return 0


def describe(audience: list[str] | None) -> str:
    from appliance.core.audience import describe as words

    return words(audience)


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.data import list_datasets

    found = list_datasets(settings)
    if args.json:
        _print_json({"datasets": [d.summary() for d in found]})
        return 0
    if not found:
        print("no datasets yet (build one: appliance dataset build --from feedback)")
    for d in found:
        print(
            f"{d.name:32s} {d.created:25s} train {d.train:5d}  heldout {d.heldout:4d}  "
            f"preferences {d.preferences:4d}  {d.sha256[:12]}"
        )
    return 0


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.data import dataset_path, load_dataset

    info = load_dataset(dataset_path(settings, args.name))  # verifies the content hash
    if args.json:
        _print_json(info.manifest)
        return 0
    print(json.dumps(info.manifest, indent=2, ensure_ascii=False))
    return 0


def add_commands(sub: Any) -> None:  # argparse._SubParsersAction
    p = sub.add_parser("dataset", help="build and inspect fine-tuning datasets")
    actions = p.add_subparsers(dest="action", required=True)

    b = actions.add_parser(
        "build", help="build a dataset from feedback, the documents or a JSONL file"
    )
    b.add_argument(
        "--from",
        dest="sources",
        action="append",
        required=True,
        metavar="feedback|docs|FILE",
        help="a source; repeat to combine: feedback (approved answers and preference pairs), "
        "docs (synthetic pairs from indexed chunks), or a JSONL file of instruction pairs",
    )
    b.add_argument("--out", help="dataset name (default: dataset-DATE-TIME)")
    b.add_argument(
        "--limit", type=int, help="at most N examples per source (docs: N chunks sampled)"
    )
    b.add_argument("--seed", type=int, default=0, help="seeds sampling and the split")
    b.add_argument(
        "--golden", help="the evaluation golden set to keep out (default: finetune.golden_path)"
    )
    b.add_argument(
        "--collections",
        action="append",
        metavar="A,B",
        help="only records drawn from these collections (top-level folders; '.' the root "
        "documents); repeat or separate with commas. A model trained on the dataset answers "
        "only users granted all of them",
    )
    b.add_argument("--json", action="store_true", help="print the summary as JSON")
    b.set_defaults(func=cmd_build, log_file=True)

    s = actions.add_parser("list", help="the built datasets")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list, log_file=False)

    s = actions.add_parser("show", help="a dataset's manifest (its content hash is verified)")
    s.add_argument("name")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show, log_file=False)
