"""Ingestion throughput of the real pipeline, as a ratio to the embedding model's raw encode.

Ingests PDFs of the shared corpus (read in place from ``../shared/eval``; the default is the 12
SEC 10-Q filings, ``--corpus all`` adds the 40 regulated PDFs) into a fresh data folder with the
real pipeline: ``open_ingestion`` (the parser sandbox, chunking, the configured embedding
model, BM25, the configured store) and ``indexer.reconcile()``. It reports files/s and chunks/s.

Then, in the same process, it rebuilds exactly the dense texts the pipeline embedded (from the
state database: each live chunk with its document's identity line through
``Indexer.dense_text``, checked against the stored text keys, deduplicated as the pipeline's
vector cache does) and times the same model's raw ``SentenceTransformer.encode`` on them at the
same batch size. The headline figure is

    ingestion chunks/s / raw encode chunks/s     (the goal: at least 0.8)

A breakdown of where the ingestion's time went is measured with timing proxies around the
objects the ``Indexer`` is built from (parser, embedder, BM25 encoder, store, state): no library
code is changed. Parsing and chunking run on the indexer's parse thread, overlapped with
embedding and writing on the main thread, so the stages do not add up to the wall time.

    .venv/bin/python benchmarks/ingest_throughput.py [--corpus sec10q|all] [--limit N] [--json]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import (
    EVAL,
    CorpusMissing,
    Stage,
    Timed,
    corpus_pdfs,
    data_folder,
    machine,
    print_json,
    quiet_libraries,
    ratio,
    setup_logging,
)

GOAL = 0.8
PARSE_THREAD = "ingest-parse"  # the name of the Indexer's parse thread


class EmbedderSeam:
    """The pipeline's embedder with its two uses timed: ``embed`` (dense vectors) and
    ``token_spans`` (the tokenizer that chunking measures chunks with)."""

    def __init__(self, inner: Any, embed: Stage, chunk: Stage) -> None:
        self._inner = inner
        self._embed = embed
        self._chunk = chunk
        self.texts = 0

    @property
    def model_id(self) -> str:
        return str(self._inner.model_id)

    @property
    def dim(self) -> int:
        return int(self._inner.dim)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        start = time.perf_counter()
        try:
            return list(self._inner.embed(texts))
        finally:
            self._embed.add(time.perf_counter() - start)
            self.texts += len(texts)

    def embed_query(self, text: str) -> list[float]:
        return list(self._inner.embed_query(text))

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        start = time.perf_counter()
        try:
            return list(self._inner.token_spans(text))
        finally:
            self._chunk.add(time.perf_counter() - start)


def embedded_texts(ingestion: Any, rels: Sequence[str]) -> list[list[str]]:
    """The dense texts the pipeline embedded, per file in the order it indexed them.

    Rebuilt from the state database; each text is checked against the text key the pipeline
    stored for it, and a text already embedded for an earlier file is left out (the vector
    cache served it), so this is exactly what went through the model.
    """
    from ingest.scan import walk

    indexer, state = ingestion.indexer, ingestion.state
    collection = indexer.collection
    files = state.files(collection)
    wanted = set(rels)
    order = [
        f.rel
        for f in walk(ingestion.docs_dir, indexer.suffixes)
        if not isinstance(f, tuple) and f.rel in wanted
    ]
    seen: set[str] = set()
    groups: list[list[str]] = []
    for rel in order:
        row = files.get(rel)
        if row is None or row.indexed_sha256 is None:
            continue
        doc = state.get_doc(row.indexed_sha256)
        if doc is None:
            raise RuntimeError(f"no identity recorded for {rel}")
        group = []
        for chunk_row in state.live_chunks_of_path(collection, rel):
            text = indexer.dense_text(doc[0], chunk_row.chunk)
            if indexer.text_key(text) != chunk_row.text_key:
                raise RuntimeError(f"rebuilt dense text of {rel} #{chunk_row.chunk.index} differs")
            if chunk_row.text_key not in seen:
                seen.add(chunk_row.text_key)
                group.append(text)
        groups.append(group)
    return groups


def raw_encode(model: Any, texts: Sequence[str], batch_size: int) -> float:
    """Seconds for one ``encode`` call over ``texts``, as the embedder calls it."""
    start = time.perf_counter()
    model.encode(
        list(texts),
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return time.perf_counter() - start


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from appliance.settings import load_settings
    from appliance.wiring import build_embedder, open_ingestion, prepare_process
    from ingest.embedders import default_embedding_folder

    files = corpus_pdfs(args.corpus)
    if args.limit:
        files = files[: args.limit]
    rels = [p.relative_to(EVAL).as_posix() for p in files]
    overrides: dict[str, Any] = {
        "data_dir": str(root),
        "ingest": {"docs_dir": str(EVAL), "reconcile_interval_s": 0},
    }
    if args.batch_size:
        overrides["embedding"] = {"batch_size": args.batch_size}
    settings = load_settings(overrides=overrides)
    prepare_process(settings)
    batch = settings.embedding.batch_size

    # The model is loaded and warmed before the clock starts, as in the running service.
    embedder = build_embedder(settings)
    warm_up = ["A warm-up sentence for the embedding model, of a few dozen tokens. " * 4] * batch
    embedder.embed(warm_up)

    stages = {name: Stage(name) for name in ("parse", "chunk", "embed", "bm25", "store", "state")}
    seam = EmbedderSeam(embedder, stages["embed"], stages["chunk"]) if args.breakdown else None
    # The shared folder is the documents folder; ``only`` restricts the scan to the chosen
    # files, so nothing is copied.
    with open_ingestion(
        settings, EVAL, role="benchmark", embedder=seam if seam is not None else embedder
    ) as ingestion:
        indexer = ingestion.indexer
        if args.breakdown:
            indexer.parser = Timed(indexer.parser, stages["parse"])
            indexer.sparse = Timed(indexer.sparse, stages["bm25"])
            indexer.store = Timed(indexer.store, stages["store"])
            indexer.state = Timed(indexer.state, stages["state"])
        start = time.perf_counter()
        report = indexer.reconcile(confirm_deletions=True, only=rels)
        wall = time.perf_counter() - start
        if report.failed:
            raise RuntimeError(f"documents failed to ingest: {report.failures}")
        groups = embedded_texts(ingestion, rels)
        store_count = ingestion.indexer.store.count()

    texts = [t for g in groups for t in g]
    if seam is not None and seam.texts != len(texts):
        raise RuntimeError(
            f"the embedder saw {seam.texts} texts but {len(texts)} were rebuilt from the state"
        )

    # The baseline: the same model folder, loaded as a bare SentenceTransformer.
    from sentence_transformers import SentenceTransformer

    folder = settings.embedding.model_path or default_embedding_folder()
    model = SentenceTransformer(str(folder), device=settings.embedding.device, local_files_only=True)
    model.encode(warm_up, batch_size=batch, show_progress_bar=False)
    raw_all = raw_encode(model, texts, batch)
    raw_per_file = sum(raw_encode(model, g, batch) for g in groups if g)

    files_done = report.added + report.updated
    ingest_cps = report.chunks / wall
    raw_cps = len(texts) / raw_all
    result: dict[str, Any] = {
        "corpus": args.corpus,
        "files": files_done,
        "chunks": report.chunks,
        "store_points": store_count,
        "embedded_texts": len(texts),
        "model": embedder.model_id,
        "batch_size": batch,
        "store": settings.store.mode,
        "ingest_seconds": round(wall, 3),
        "ingest_files_per_s": round(files_done / wall, 3),
        "ingest_chunks_per_s": round(ingest_cps, 2),
        "raw_encode_seconds": round(raw_all, 3),
        "raw_encode_chunks_per_s": round(raw_cps, 2),
        "raw_encode_per_file_seconds": round(raw_per_file, 3),
        "raw_encode_per_file_chunks_per_s": round(len(texts) / raw_per_file, 2),
        "ratio": ratio(ingest_cps, raw_cps),
        "goal": GOAL,
        "machine": machine(),
    }
    if args.breakdown:
        result["breakdown_s"] = breakdown(stages, wall)
    return result


def breakdown(stages: dict[str, Stage], wall: float) -> dict[str, dict[str, float]]:
    """Busy seconds per stage on each thread; ``other`` on the main thread is the rest of the
    wall time (waiting for the parse thread, hashing, bookkeeping)."""
    main = {name: round(s.total("main"), 3) for name, s in stages.items() if s.total("main")}
    main["other"] = round(wall - sum(s.total("main") for s in stages.values()), 3)
    parse = {
        name: round(s.total(PARSE_THREAD), 3) for name, s in stages.items() if s.total(PARSE_THREAD)
    }
    return {"main_thread": main, "parse_thread": parse}


def print_report(r: dict[str, Any]) -> None:
    m = r["machine"]
    print(
        f"Ingestion throughput: {r['files']} PDFs ({r['corpus']}), {r['chunks']} chunks, "
        f"store {r['store']}, batch {r['batch_size']}, {m['cpus']} CPUs"
    )
    print(f"  model: {r['model']}")
    print(
        f"  ingestion    {r['ingest_seconds']:8.1f} s  {r['ingest_files_per_s']:7.3f} files/s  "
        f"{r['ingest_chunks_per_s']:7.1f} chunks/s"
    )
    print(
        f"  raw encode   {r['raw_encode_seconds']:8.1f} s  {'':15}  "
        f"{r['raw_encode_chunks_per_s']:7.1f} chunks/s  "
        f"({r['embedded_texts']} texts, one encode call)"
    )
    print(
        f"  raw per file {r['raw_encode_per_file_seconds']:8.1f} s  {'':15}  "
        f"{r['raw_encode_per_file_chunks_per_s']:7.1f} chunks/s  (one encode call per file)"
    )
    verdict = "meets" if (r["ratio"] or 0) >= r["goal"] else "below"
    print(
        f"  ratio ingestion / raw encode = {r['ratio']:.3f}  ({verdict} the goal of {r['goal']})"
    )
    if "breakdown_s" in r:
        b = r["breakdown_s"]
        print("  busy seconds per stage (the parse thread overlaps the main thread):")
        print("    main thread:  " + ", ".join(f"{k} {v:.1f}" for k, v in b["main_thread"].items()))
        print("    parse thread: " + ", ".join(f"{k} {v:.1f}" for k, v in b["parse_thread"].items()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--corpus",
        choices=("sec10q", "all"),
        default="sec10q",
        help="sec10q: the 12 filings (default); all: also the 40 PDFs of ../shared/eval/regulated",
    )
    parser.add_argument("--limit", type=int, default=0, help="only the first N files (0: all)")
    parser.add_argument(
        "--batch-size", type=int, default=0, help="embedding batch size (default: the settings')"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="an empty folder for the index and state, kept afterwards (default: a temporary one)",
    )
    parser.add_argument(
        "--no-breakdown",
        dest="breakdown",
        action="store_false",
        help="no timing proxies around the pipeline's parts",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the pipeline's progress")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    quiet_libraries()
    if args.limit < 0:
        print("--limit must be 0 (all) or positive", file=sys.stderr)
        return 2
    if args.data_dir is not None and args.data_dir.exists() and any(args.data_dir.iterdir()):
        print(f"--data-dir {args.data_dir} is not empty: the benchmark needs a fresh index",
              file=sys.stderr)
        return 2
    try:
        corpus_pdfs(args.corpus)
        with data_folder(args.data_dir, "ingest-throughput-") as root:
            result = run(args, root)
    except CorpusMissing as exc:
        print(f"ingest_throughput: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print_json(result)
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
