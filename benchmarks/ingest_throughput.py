"""Ingestion throughput of the real pipeline, as a ratio to the embedding model's raw encode.

Ingests PDFs of the shared corpus (read in place from ``../shared/eval``; the default is the 12
SEC 10-Q filings, ``--corpus all`` adds the 40 regulated PDFs) into a fresh data folder with the
real pipeline: ``open_ingestion`` (the parser sandbox, chunking, the configured embedding
model, BM25, the configured store) and ``indexer.reconcile()``, and reports files/s and
chunks/s.

Then, in the same process, it rebuilds exactly the dense texts the pipeline embedded (from the
state database: every live chunk with its document's identity line through
``Indexer.dense_text``, checked against the text key stored with it, deduplicated as the
pipeline's vector cache does) and times the same model folder's raw
``SentenceTransformer.encode`` on them in one call at the same batch size. The headline is

    ingestion chunks/s / raw encode chunks/s     (the goal: at least 0.8)

Where the time went is measured with timing proxies around the objects the ``Indexer`` is
built from (parser, embedder, BM25 encoder, store, state): no library code is changed. ``parse``
is the sandbox round trip, ``chunk`` the tokenizer calls chunking makes (about 90% of its time),
``embed`` the model, ``bm25`` the sparse vectors, ``store`` and ``state`` the index and SQLite.
Parsing and chunking run on the indexer's parse thread, overlapped with embedding and writing on
the main thread, so the stages do not add up to the wall time.

A 2-core machine shared with other work changes speed by tens of percent from minute to
minute, so each round pairs an ingestion with the baseline right after it, a fixed speed probe
runs before, between and after them to show the drift, and ``--rounds N`` repeats the pair (the
median is reported). The same ratio per CPU second (this process's threads plus the parser
process) is printed too: it is less sensitive to other processes taking the CPU away.

Table handling (``ingest.tables``) costs parse time on pages that look tabular, and only there.
``--tables-ratio`` (the default) parses every chosen PDF in this process with table handling on
and off, alternately, and prints the ratio of the parse times: for the PDFs where no table was
found ("text PDFs", whose ingestion must not get slower) and for all. OCR is off for it: a scan
costs the same either way. ``--tables off`` runs the ingestion itself without table handling.

    .venv/bin/python benchmarks/ingest_throughput.py [--corpus sec10q|all] [--limit N]
        [--match TEXT] [--rounds N] [--per-file] [--tables on|off] [--no-tables-ratio] [--json]
"""

from __future__ import annotations

import argparse
import resource
import statistics
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
    load_note,
    machine,
    print_json,
    quiet_libraries,
    ratio,
    setup_logging,
)

GOAL = 0.8
PARSE_THREAD = "ingest-parse"  # the name the Indexer gives its parse thread
STAGES = ("parse", "chunk", "embed", "bm25", "store", "state")
# About 150 tokens, like a chunk: the speed probe's and the warm-up's text.
PROBE_TEXT = (
    "Net sales increased during the third quarter compared to the same quarter a year ago, "
    "driven by higher sales of services and wearables, partially offset by lower sales of Mac. "
) * 5


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
    """The dense texts the pipeline embedded, per file, in the order it indexed the files.

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
        found.rel
        for found in walk(ingestion.docs_dir, indexer.suffixes)
        if not isinstance(found, tuple) and found.rel in wanted
    ]
    seen: set[str] = set()
    groups: list[list[str]] = []
    for rel in order:
        row = files.get(rel)
        if row is None or row.indexed_sha256 is None:
            continue
        doc = state.get_doc(row.indexed_sha256)
        if doc is None:
            raise RuntimeError(f"no identity line recorded for {rel}")
        group = []
        for chunk_row in state.live_chunks_of_path(collection, rel):
            text = indexer.dense_text(doc[0], chunk_row.chunk)
            if indexer.text_key(text) != chunk_row.text_key:
                raise RuntimeError(f"the rebuilt text of {rel} #{chunk_row.chunk.index} differs")
            if chunk_row.text_key not in seen:
                seen.add(chunk_row.text_key)
                group.append(text)
        groups.append(group)
    return groups


def children_cpu() -> float:
    """CPU seconds of this process's finished child processes (the parser sandbox)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def encode_timed(model: Any, texts: Sequence[str], batch_size: int) -> tuple[float, float]:
    """Wall and CPU seconds of one raw ``encode`` call, with the embedder's arguments."""
    wall, cpu = time.perf_counter(), time.process_time()
    model.encode(
        list(texts),
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return time.perf_counter() - wall, time.process_time() - cpu


def encode_seconds(model: Any, texts: Sequence[str], batch_size: int) -> float:
    return encode_timed(model, texts, batch_size)[0]


def probe(model: Any, texts: int, batch_size: int) -> float | None:
    """The raw model's chunks/s on ``texts`` copies of a fixed text: the machine's speed now."""
    if not texts:
        return None
    return texts / encode_seconds(model, [PROBE_TEXT] * texts, batch_size)


def ingest_once(
    settings: Any, embedder: Any, rels: Sequence[str], *, breakdown: bool
) -> dict[str, Any]:
    """One fresh ingestion of ``rels`` (paths relative to the shared folder)."""
    from appliance.wiring import open_ingestion

    stages = {name: Stage(name) for name in STAGES}
    children_before = children_cpu()
    seam = EmbedderSeam(embedder, stages["embed"], stages["chunk"]) if breakdown else None
    # The shared folder is the documents folder, read in place; ``only`` limits the scan to
    # the chosen files.
    with open_ingestion(
        settings, EVAL, role="benchmark", embedder=seam if seam is not None else embedder
    ) as ingestion:
        indexer = ingestion.indexer
        if breakdown:
            indexer.parser = Timed(indexer.parser, stages["parse"])
            indexer.sparse = Timed(indexer.sparse, stages["bm25"])
            indexer.store = Timed(indexer.store, stages["store"])
            indexer.state = Timed(indexer.state, stages["state"])
        start, cpu = time.perf_counter(), time.process_time()
        report = indexer.reconcile(confirm_deletions=True, only=rels)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        if report.failed:
            raise RuntimeError(f"documents failed to ingest: {report.failures}")
        groups = embedded_texts(ingestion, rels)
        points = ingestion.indexer.store.count()
    # The sandbox has exited and been reaped now: its CPU time is counted.
    cpu += children_cpu() - children_before
    texts = sum(len(g) for g in groups)
    if seam is not None and seam.texts != texts:
        raise RuntimeError(f"the embedder saw {seam.texts} texts; the state holds {texts}")
    out: dict[str, Any] = {
        "files": report.added + report.updated,
        "chunks": report.chunks,
        "store_points": points,
        "seconds": wall,
        "cpu_seconds": cpu,
        "groups": groups,
    }
    if breakdown:
        out["breakdown_s"] = stage_breakdown(stages, wall)
    return out


def table_parse_ratio(files: Sequence[Path], repeats: int = 3) -> dict[str, Any]:
    """Parse time with table handling / without, per PDF (best of ``repeats``, alternating so
    that drift hits both), summed over text PDFs (no table found) and over all."""
    from appliance.core.errors import ParseError
    from ingest.ocr import OcrOptions
    from ingest.parsers import ParseOptions, parse_file

    on = ParseOptions(ocr=OcrOptions(engine="off"), tables=True)
    off = ParseOptions(ocr=OcrOptions(engine="off"), tables=False)
    sums = {"text_on": 0.0, "text_off": 0.0, "all_on": 0.0, "all_off": 0.0}
    counts = {"text": 0, "with_tables": 0, "skipped": 0, "tables": 0, "pages": 0}
    for path in files:
        best = {"on": float("inf"), "off": float("inf")}
        try:
            for _ in range(repeats):
                for name, options in (("on", on), ("off", off)):
                    start = time.perf_counter()
                    doc = parse_file(path, options)
                    best[name] = min(best[name], time.perf_counter() - start)
        except ParseError:  # a scan: nothing to compare without OCR
            counts["skipped"] += 1
            continue
        tables = sum(1 for section in parse_file(path, on).sections if section.header is not None)
        counts["tables"] += tables
        counts["pages"] += doc.pages or 0
        kind = "text" if tables == 0 else "with_tables"
        counts[kind] += 1
        sums["all_on"] += best["on"]
        sums["all_off"] += best["off"]
        if kind == "text":
            sums["text_on"] += best["on"]
            sums["text_off"] += best["off"]
    return {
        **counts,
        "seconds": {k: round(v, 3) for k, v in sums.items()},
        "text_ratio": ratio(sums["text_on"], sums["text_off"]) if counts["text"] else None,
        "all_ratio": ratio(sums["all_on"], sums["all_off"]) if sums["all_off"] else None,
    }


def stage_breakdown(stages: dict[str, Stage], wall: float) -> dict[str, dict[str, float]]:
    """Busy seconds per stage on each thread; ``other`` on the main thread is the rest of its
    wall time (waiting for the parse thread, hashing, bookkeeping)."""
    main = {name: round(s.total("main"), 3) for name, s in stages.items() if s.total("main")}
    main["other"] = round(wall - sum(s.total("main") for s in stages.values()), 3)
    parse = {
        name: round(s.total(PARSE_THREAD), 3) for name, s in stages.items() if s.total(PARSE_THREAD)
    }
    return {"main_thread": main, "parse_thread": parse}


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    from appliance.core.settings import load_settings
    from appliance.wiring import build_embedder, prepare_process
    from ingest.embedders import default_embedding_folder

    at_start = machine()
    files = [p for p in corpus_pdfs(args.corpus) if args.match in p.name]
    if args.limit:
        files = files[: args.limit]
    if not files:
        raise CorpusMissing(f"no PDF of the {args.corpus} corpus matches {args.match!r}")
    rels = [p.relative_to(EVAL).as_posix() for p in files]

    def settings_for(data: Path) -> Any:
        overrides: dict[str, Any] = {
            "data_dir": str(data),
            "ingest": {
                "docs_dir": str(EVAL),
                "reconcile_interval_s": 0,
                "tables": args.tables == "on",
            },
        }
        if args.batch_size:
            overrides["embedding"] = {"batch_size": args.batch_size}
        return load_settings(overrides=overrides)

    settings = settings_for(root / "round-1")
    prepare_process(settings)
    batch = settings.embedding.batch_size
    # Both models are loaded and warmed before any clock starts, as in the running service.
    embedder = build_embedder(settings)
    embedder.embed([PROBE_TEXT] * 8)
    folder = settings.embedding.model_path or default_embedding_folder()
    model = SentenceTransformer(
        str(folder), device=settings.embedding.device, local_files_only=True
    )
    encode_seconds(model, [PROBE_TEXT] * 8, batch)

    rounds = []
    for n in range(1, args.rounds + 1):
        round_settings = settings_for(root / f"round-{n}")
        speed = [probe(model, args.probe_texts, batch)]
        ingested = ingest_once(round_settings, embedder, rels, breakdown=args.breakdown)
        speed.append(probe(model, args.probe_texts, batch))
        groups = ingested.pop("groups")
        texts = [t for g in groups for t in g]
        raw, raw_cpu = encode_timed(model, texts, batch)
        speed.append(probe(model, args.probe_texts, batch))
        ingest_cps = ingested["chunks"] / ingested["seconds"]
        raw_cps = len(texts) / raw
        one: dict[str, Any] = {
            **{k: v for k, v in ingested.items() if k != "breakdown_s"},
            "embedded_texts": len(texts),
            "seconds": round(ingested["seconds"], 3),
            "files_per_s": round(ingested["files"] / ingested["seconds"], 4),
            "chunks_per_s": round(ingest_cps, 2),
            "raw_encode_seconds": round(raw, 3),
            "raw_encode_chunks_per_s": round(raw_cps, 2),
            "ratio": ratio(ingest_cps, raw_cps),
            "cpu_seconds": round(ingested["cpu_seconds"], 3),
            "raw_encode_cpu_seconds": round(raw_cpu, 3),
            "cpu_ratio": ratio(ingested["chunks"] / ingested["cpu_seconds"], len(texts) / raw_cpu),
            "probe_chunks_per_s": [None if s is None else round(s, 2) for s in speed],
        }
        if args.per_file:
            per_file = sum(encode_seconds(model, g, batch) for g in groups if g)
            one["raw_per_file_seconds"] = round(per_file, 3)
            one["raw_per_file_chunks_per_s"] = round(len(texts) / per_file, 2)
            one["ratio_to_per_file"] = ratio(ingest_cps, len(texts) / per_file)
        if "breakdown_s" in ingested:
            one["breakdown_s"] = ingested["breakdown_s"]
        rounds.append(one)

    tables = table_parse_ratio(files) if args.tables_ratio else None
    return {
        "corpus": args.corpus,
        "documents": len(files),
        "tables": args.tables,
        "table_parse": tables,
        "model": embedder.model_id,
        "model_folder": str(folder),
        "batch_size": batch,
        "store": settings.store.mode,
        "ratio": round(statistics.median(r["ratio"] for r in rounds), 3),
        "cpu_ratio": round(statistics.median(r["cpu_ratio"] for r in rounds), 3),
        "goal": GOAL,
        "rounds": rounds,
        "machine": at_start,
    }


def print_report(result: dict[str, Any]) -> None:
    m = result["machine"]
    first = result["rounds"][0]
    print(
        f"Ingestion throughput: {first['files']} PDFs of {result['corpus']}, "
        f"{first['chunks']} chunks, store {result['store']}, embedding batch "
        f"{result['batch_size']}, {m['cpus']} CPUs"
    )
    print(f"  model {result['model_folder']}")
    print("  each round: a fresh ingestion, then the raw encode baseline on the same texts")
    for n, r in enumerate(result["rounds"], 1):
        print(f"  round {n}")
        print(
            f"    ingestion     {r['seconds']:7.1f} s  {r['files_per_s']:7.3f} files/s  "
            f"{r['chunks_per_s']:6.1f} chunks/s"
        )
        print(
            f"    raw encode    {r['raw_encode_seconds']:7.1f} s  {'':15}  "
            f"{r['raw_encode_chunks_per_s']:6.1f} chunks/s  "
            f"({r['embedded_texts']} texts in one encode call)"
        )
        if "raw_per_file_seconds" in r:
            print(
                f"    raw per file  {r['raw_per_file_seconds']:7.1f} s  {'':15}  "
                f"{r['raw_per_file_chunks_per_s']:6.1f} chunks/s  (one encode call per file; "
                f"ingestion / this = {r['ratio_to_per_file']:.3f})"
            )
        print(f"    ratio ingestion / raw encode = {r['ratio']:.3f}")
        print(
            f"    per CPU second: ingestion {r['cpu_seconds']:.1f} s of CPU (with the parser "
            f"process), raw encode {r['raw_encode_cpu_seconds']:.1f} s; ratio "
            f"{r['cpu_ratio']:.3f}"
        )
        if None not in r["probe_chunks_per_s"]:
            probes = " -> ".join(f"{s:.1f}" for s in r["probe_chunks_per_s"])
            print(f"    speed probe (raw chunks/s) before / between / after: {probes}")
        if "breakdown_s" in r:
            b = r["breakdown_s"]
            print("    busy seconds per stage (the parse thread overlaps the main thread):")
            print("      main thread:  " + _stages(b["main_thread"]))
            print("      parse thread: " + _stages(b["parse_thread"]))
    verdict = "meets" if result["ratio"] >= result["goal"] else "is below"
    many = f"median of {len(result['rounds'])} rounds: " if len(result["rounds"]) > 1 else ""
    print(
        f"  => ingestion chunks/s / raw encode chunks/s = {many}{result['ratio']:.3f} "
        f"({verdict} the goal of {result['goal']}); per CPU second: {result['cpu_ratio']:.3f}"
    )
    t = result.get("table_parse")
    if t:
        secs = t["seconds"]
        print(
            f"  table handling (ingestion ran with tables {result['tables']}): "
            f"{t['tables']} tables in {t['with_tables']} of "
            f"{t['with_tables'] + t['text']} PDFs ({t['pages']} pages, {t['skipped']} scans "
            "skipped); parse time on / off, best of 3:"
        )
        if t["text_ratio"] is not None:
            print(
                f"    text PDFs (no table found): {secs['text_on']:.2f} s / "
                f"{secs['text_off']:.2f} s = {t['text_ratio']:.3f}"
            )
        if t["all_ratio"] is not None:
            print(
                f"    all PDFs: {secs['all_on']:.2f} s / {secs['all_off']:.2f} s = "
                f"{t['all_ratio']:.3f}"
            )
    print(f"  {load_note(m)}")


def _stages(stages: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.1f}" for name, seconds in stages.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--corpus",
        choices=("sec10q", "all"),
        default="sec10q",
        help="sec10q: the 12 filings (default); all: also the 40 PDFs of ../shared/eval/regulated",
    )
    parser.add_argument("--match", default="", help="only PDFs whose file name contains this")
    parser.add_argument("--limit", type=int, default=0, help="only the first N PDFs (0: all)")
    parser.add_argument("--rounds", type=int, default=1, help="ingestion + baseline pairs")
    parser.add_argument(
        "--batch-size", type=int, default=0, help="embedding batch size (default: the settings')"
    )
    parser.add_argument(
        "--per-file",
        action="store_true",
        help="also time the baseline as one encode call per file, as the pipeline calls it",
    )
    parser.add_argument(
        "--probe-texts",
        type=int,
        default=32,
        help="texts of the speed probe run before, between and after the measurements, to "
        "show how the machine's speed drifted (0: no probe)",
    )
    parser.add_argument(
        "--no-breakdown",
        dest="breakdown",
        action="store_false",
        help="no timing proxies around the pipeline's parts",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="an empty folder for the indexes and states, kept (default: a temporary folder)",
    )
    parser.add_argument(
        "--tables",
        choices=("on", "off"),
        default="on",
        help="table handling during the ingestion (the setting ingest.tables)",
    )
    parser.add_argument(
        "--no-tables-ratio",
        dest="tables_ratio",
        action="store_false",
        help="skip the parse-time ratio of table handling on / off",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the pipeline's progress")
    return parser


def main(argv: list[str] | None = None) -> int:
    from appliance.core.errors import ApplianceError

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    quiet_libraries()
    if min(args.limit, args.batch_size, args.probe_texts) < 0 or args.rounds < 1:
        print(
            "--limit, --batch-size and --probe-texts must be >= 0, --rounds >= 1", file=sys.stderr
        )
        return 2
    if args.data_dir is not None and args.data_dir.exists() and any(args.data_dir.iterdir()):
        print(
            f"--data-dir {args.data_dir} is not empty; the benchmark measures a fresh ingestion",
            file=sys.stderr,
        )
        return 2
    try:
        corpus_pdfs(args.corpus)
        with data_folder(args.data_dir, "ingest-throughput-") as root:
            result = run(args, root)
    except CorpusMissing as exc:
        print(f"ingest_throughput: {exc}", file=sys.stderr)
        return 2
    except ApplianceError as exc:  # a store, model or settings problem, with its fix
        print(f"ingest_throughput: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print_json(result)
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
