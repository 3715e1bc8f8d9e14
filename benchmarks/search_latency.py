"""Search latency of both vector store implementations, as a ratio of one to the other.

Fills each store with chunk-like points: a 384-d random unit vector (the embedding model's
size) and the BM25 sparse vector of a realistic text (by default windows of 80 to 200 words of
the SEC 10-Q filings' text, read in place from ``../shared/eval``; ``--texts synthetic`` draws
Zipf-distributed words instead) with a payload like the pipeline's, inserted in batches of 1000
through the ``VectorStore`` interface. It then times ``VectorStore.query`` for hybrid queries
(dense + BM25 fused with RRF, the appliance's default; BM25 of the evaluation questions) and
for dense-only queries, and prints p50 / p95 / mean per store and the ratio between the stores.

- Qdrant Edge (``EdgeBackend`` in a temporary folder) at ``--points`` (100,000). After the
  inserts it runs the shard's optimizer (segment merge + HNSW build). ``EdgeStore`` has no
  method for that (and the appliance never optimizes), so this benchmark calls the private
  ``_shard.optimize()``; the latency before optimizing is reported too, and the gain.
- The qdrant-client path (``ServerBackend``): with ``--server-url`` a Qdrant server at
  ``--points``; without it qdrant-client's local mode (``QdrantClient(":memory:")``, or
  ``--server-local path`` for ``QdrantClient(path=...)``), which searches by brute force in
  Python and inserts slowly (facts.md: 332 s for 100,000 points on disk), so it is capped at
  ``--server-points`` (20,000) and Edge is measured at that size too, on the way up, for a
  comparison at equal size.

Query vectors are prepared before the clock starts: only the store query is timed.

    .venv/bin/python benchmarks/search_latency.py [--points N] [--server-points N]
        [--server-url URL] [--queries N] [--texts corpus|synthetic] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    SEC10Q,
    CorpusMissing,
    data_folder,
    latency_summary,
    load_note,
    machine,
    print_json,
    quiet_libraries,
    ratio,
    require_dir,
    setup_logging,
)

DIM = 384
BATCH = 1000
COLLECTION = "bench_search_latency"
WARM_UP_QUERIES = 10
MODES = ("hybrid", "dense")


# --- the data ------------------------------------------------------------------------------


class Corpus:
    """Deterministic chunk-like texts: window ``i`` is a slice of a long word list."""

    def __init__(self, words: Sequence[str], questions: Sequence[str], seed: int) -> None:
        if len(words) < 1000:
            raise CorpusMissing(f"too little text for the benchmark ({len(words)} words)")
        self.words = list(words)
        self.questions = list(questions)
        self.seed = seed

    def text(self, i: int) -> str:
        rng = random.Random(self.seed * 1_000_003 + i)
        length = rng.randint(80, 200)
        start = rng.randrange(0, len(self.words) - length)
        return " ".join(self.words[start : start + length])


def corpus_words(seed: int) -> tuple[list[str], list[str]]:
    """The words of the SEC 10-Q filings (parsed in this process) and the eval questions."""
    from ingest.parsers import parse_file

    docs = require_dir(SEC10Q / "docs", "the SEC 10-Q corpus")
    pdfs = sorted(docs.glob("*.pdf"))
    if not pdfs:
        raise CorpusMissing(f"no PDF in {docs}")
    words: list[str] = []
    for pdf in pdfs:
        for section in parse_file(pdf).sections:
            words.extend(section.text.split())
    questions = []
    qa = SEC10Q / "qa.jsonl"
    if qa.is_file():
        for line in qa.read_text(encoding="utf-8").splitlines():
            if line.strip():
                questions.append(str(json.loads(line)["question"]))
    if not questions:
        questions = synthetic_questions(words, seed)
    return words, questions


def synthetic_words(seed: int, n_words: int = 400_000, vocab: int = 30_000) -> list[str]:
    """Pronounceable made-up words with a Zipf (s=1.1) frequency, like a natural language."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    lexicon: list[str] = []
    seen: set[str] = set()
    while len(lexicon) < vocab:
        word = "".join(rng.choice(syllables) for _ in range(rng.randint(2, 4)))
        if word not in seen:
            seen.add(word)
            lexicon.append(word)
    weights = [1 / (rank**1.1) for rank in range(1, vocab + 1)]
    return rng.choices(lexicon, weights=weights, k=n_words)


def synthetic_questions(words: Sequence[str], seed: int, n: int = 200) -> list[str]:
    rng = random.Random(seed + 1)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))) for _ in range(n)]


def unit_vectors(rng: Any, n: int) -> Any:
    """``n`` random 384-d unit vectors (float32), uniformly distributed on the sphere."""
    import numpy as np

    vectors = rng.standard_normal((n, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


class PointSource:
    """The benchmark's points, generated batch by batch (the sparse vectors of 100,000 texts
    would not fit in memory as Python lists), identical for both stores."""

    def __init__(self, corpus: Corpus, sparse: Any, seed: int) -> None:
        self.corpus = corpus
        self.sparse = sparse
        self._seed = seed
        self.prepare_seconds = 0.0

    def batches(self, start: int, stop: int) -> Iterator[list[Any]]:
        import numpy as np

        from appliance.core.protocols import Point

        for lo in range(start, stop, BATCH):
            began = time.perf_counter()
            hi = min(lo + BATCH, stop)
            # The vectors of a batch depend on its start only, so both stores get the same.
            dense = unit_vectors(np.random.default_rng((self._seed, lo)), hi - lo)
            points = []
            for j, i in enumerate(range(lo, hi)):
                text = self.corpus.text(i)
                doc = i // 250
                points.append(
                    Point(
                        id=str(uuid.UUID(int=i + 1)),
                        dense=dense[j].tolist(),
                        sparse=self.sparse.embed_document(text),
                        payload={
                            "path": f"folder-{doc % 7}/document-{doc}.pdf",
                            "collection": f"folder-{doc % 7}",
                            "doc_hash": f"{doc:064x}",
                            "chunk_index": i % 250,
                            "page": 1 + (i % 250) // 4,
                            "heading": None,
                            "start": 0,
                            "end": len(text),
                            "text": text,
                            "identity": f"Document {doc}",
                        },
                    )
                )
            self.prepare_seconds += time.perf_counter() - began
            yield points


@dataclass(frozen=True)
class Queries:
    dense: list[list[float]]
    sparse: list[Any]


def make_queries(corpus: Corpus, sparse: Any, n: int, seed: int) -> Queries:
    import numpy as np

    # Seeded apart from the points' vectors, which use (seed, first index of the batch).
    vectors = unit_vectors(np.random.default_rng((seed, 2**40)), n)
    texts = [corpus.questions[i % len(corpus.questions)] for i in range(n)]
    return Queries([v.tolist() for v in vectors], [sparse.embed_query(t) for t in texts])


# --- measuring -----------------------------------------------------------------------------


def insert(store: Any, source: PointSource, start: int, stop: int) -> float:
    """Upsert points ``start..stop`` in batches of 1000; seconds spent in the store only."""
    seconds = 0.0
    for points in source.batches(start, stop):
        began = time.perf_counter()
        store.upsert(points)
        seconds += time.perf_counter() - began
    began = time.perf_counter()
    store.flush()
    return seconds + time.perf_counter() - began


def measure(store: Any, queries: Queries, k: int) -> dict[str, dict[str, float]]:
    """Latency of every query in each mode (after a few unmeasured warm-up queries)."""
    out = {}
    for mode in MODES:
        for i in range(min(WARM_UP_QUERIES, len(queries.dense))):
            store.query(queries.dense[i], queries.sparse[i], k, mode=mode)
        seconds = []
        for dense, sparse in zip(queries.dense, queries.sparse, strict=True):
            began = time.perf_counter()
            hits = store.query(dense, sparse, k, mode=mode)
            seconds.append(time.perf_counter() - began)
            if not hits:
                raise RuntimeError(f"a {mode} query found nothing in {store.name}")
        out[mode] = latency_summary(seconds)
    return out


def optimize_edge(store: Any) -> float:
    """Run Qdrant Edge's optimizer (merge segments, build HNSW). ``EdgeStore`` does not offer
    it, so the benchmark reaches into the private shard: benchmark-only, never library use."""
    began = time.perf_counter()
    store._shard.optimize()
    return time.perf_counter() - began


def run_edge(
    root: Path, source: PointSource, queries: Queries, args: argparse.Namespace, also_at: int
) -> list[dict[str, Any]]:
    from ingest.store import EdgeBackend

    rows = []
    backend = EdgeBackend(root / "edge")
    try:
        store = backend.open(COLLECTION, DIM)
        done = 0
        insert_s = 0.0
        steps = [n for n in (also_at, args.points) if 0 < n < args.points] + [args.points]
        for target in steps:
            insert_s += insert(store, source, done, target)
            done = target
            row: dict[str, Any] = {
                "store": "qdrant-edge",
                "points": store.count(),
                "insert_s": round(insert_s, 2),
            }
            if target == args.points:
                unoptimized = dict(row, store="qdrant-edge (not optimized)")
                unoptimized["latency"] = measure(store, queries, args.k)
                rows.append(unoptimized)
            if args.optimize:
                row["optimize_s"] = round(optimize_edge(store), 2)
                row["latency"] = measure(store, queries, args.k)
                rows.append(row)
    finally:
        backend.close()
    return rows


def run_server(
    root: Path, source: PointSource, queries: Queries, args: argparse.Namespace, points: int
) -> dict[str, Any]:
    from qdrant_client import QdrantClient

    from appliance.core.errors import StoreError
    from ingest.store import ServerBackend

    if args.server_url:
        client = QdrantClient(url=args.server_url, api_key=args.server_api_key)
        label = f"qdrant server ({args.server_url})"
    elif args.server_local == "path":
        client = QdrantClient(path=str(root / "qdrant-local"))
        label = "qdrant-client local (path)"
    else:
        client = QdrantClient(":memory:")
        label = "qdrant-client local (:memory:)"
    backend = ServerBackend(client, COLLECTION)
    try:
        if args.server_url:
            try:
                existing = backend.collections()
            except Exception as exc:  # qdrant-client raises its own transport errors
                raise StoreError(
                    f"cannot reach the Qdrant server at {args.server_url}: {exc}"
                ) from exc
            if COLLECTION in existing:  # left over by an interrupted run of this benchmark
                backend.drop(COLLECTION)
        store = backend.open(COLLECTION, DIM)
        with warnings.catch_warnings():
            # Local mode warns above 20,000 points that it is slow: that is what we measure.
            warnings.filterwarnings("ignore", message=".*Local mode is not recommended.*")
            insert_s = insert(store, source, 0, points)
            row: dict[str, Any] = {
                "store": label,
                "points": store.count(),
                "insert_s": round(insert_s, 2),
            }
            row["latency"] = measure(store, queries, args.k)
        if args.server_url:
            backend.drop(COLLECTION)
    finally:
        backend.close()
    return row


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from appliance.core.settings import load_settings
    from appliance.wiring import prepare_process
    from ingest.embedders import Bm25Encoder

    at_start = machine()
    overrides: dict[str, Any] = {"data_dir": str(root)}
    if args.server_url:
        overrides["store"] = {"url": args.server_url}
    prepare_process(load_settings(overrides=overrides))

    if args.texts == "corpus":
        words, questions = corpus_words(args.seed)
    else:
        words = synthetic_words(args.seed)
        questions = synthetic_questions(words, args.seed)
    corpus = Corpus(words, questions, args.seed)
    sparse = Bm25Encoder()
    source = PointSource(corpus, sparse, args.seed)
    queries = make_queries(corpus, sparse, args.queries, args.seed)

    server_points = args.server_points
    if server_points is None:
        server_points = args.points if args.server_url else min(args.points, 20_000)
    server_points = min(server_points, args.points)

    rows = run_edge(root, source, queries, args, also_at=server_points)
    server = run_server(root, source, queries, args, server_points) if server_points else None
    if server is not None:
        rows.append(server)

    comparisons = []
    optimized = [r for r in rows if r["store"] == "qdrant-edge"]
    if server is not None:
        for edge in optimized:
            for mode in MODES:
                comparisons.append(
                    {
                        "mode": mode,
                        "server_points": server["points"],
                        "edge_points": edge["points"],
                        "p50_ratio": ratio(
                            server["latency"][mode]["p50_ms"], edge["latency"][mode]["p50_ms"]
                        ),
                        "p95_ratio": ratio(
                            server["latency"][mode]["p95_ms"], edge["latency"][mode]["p95_ms"]
                        ),
                    }
                )
    gains = []
    unoptimized = [r for r in rows if r["store"] == "qdrant-edge (not optimized)"]
    for before in unoptimized:
        for after in (r for r in optimized if r["points"] == before["points"]):
            for mode in MODES:
                gains.append(
                    {
                        "mode": mode,
                        "points": after["points"],
                        "p50_ratio": ratio(
                            before["latency"][mode]["p50_ms"], after["latency"][mode]["p50_ms"]
                        ),
                    }
                )
    return {
        "points": args.points,
        "server_points": server_points,
        "server_capped": server is not None and server_points < args.points,
        "queries": args.queries,
        "k": args.k,
        "texts": args.texts,
        "point_preparation_s": round(source.prepare_seconds, 1),
        "stores": rows,
        "ratios": comparisons,
        "edge_optimize_gain": gains,
        "machine": at_start,
    }


def print_report(r: dict[str, Any]) -> None:
    m = r["machine"]
    texts = "windows of the SEC 10-Q text" if r["texts"] == "corpus" else "synthetic Zipf texts"
    print(
        f"Search latency: top-{r['k']}, {r['queries']} queries per mode; 384-d random unit "
        f"vectors + BM25 of {texts}; {m['cpus']} CPUs"
    )
    head = f"  {'store':<30} {'points':>7} {'insert s':>9} {'optim. s':>9}"
    head += "".join(f"  {mode + ' p50/p95/mean ms':>26}" for mode in MODES)
    print(head)
    for row in r["stores"]:
        line = f"  {row['store']:<30} {row['points']:>7} {row['insert_s']:>9.1f} "
        line += f"{row['optimize_s']:>9.1f}" if "optimize_s" in row else f"{'-':>9}"
        for mode in MODES:
            lat = row["latency"][mode]
            cell = f"{lat['p50_ms']:.2f} / {lat['p95_ms']:.2f} / {lat['mean_ms']:.2f}"
            line += f"  {cell:>26}"
        print(line)
    if r["server_capped"]:
        print(
            f"  note: qdrant-client local mode is capped at {r['server_points']} points "
            "(--server-points; it is brute force and slow to fill); Qdrant Edge is also "
            "measured at that size for a comparison at equal size."
        )
    for c in r["ratios"]:
        if c["edge_points"] == c["server_points"]:
            what = f"qdrant-client / Qdrant Edge, both at {c['edge_points']} points"
        else:
            what = (
                f"qdrant-client at {c['server_points']} points / "
                f"Qdrant Edge at {c['edge_points']} points"
            )
        print(
            f"  latency ratio {what}, {c['mode']}: "
            f"p50 x{_x(c['p50_ratio'])}, p95 x{_x(c['p95_ratio'])}"
        )
    for g in r["edge_optimize_gain"]:
        print(
            f"  Qdrant Edge at {g['points']} points, {g['mode']}: p50 not optimized / "
            f"optimized = x{_x(g['p50_ratio'])}"
        )
    print(f"  (generating the points took {r['point_preparation_s']} s, not counted above)")
    print(f"  {load_note(m)}")


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--points", type=int, default=100_000, help="points in Qdrant Edge")
    parser.add_argument(
        "--server-points",
        type=int,
        default=None,
        help="points for the qdrant-client path (default: 20000 in local mode, --points with "
        "--server-url; 0 skips it)",
    )
    parser.add_argument("--server-url", help="a Qdrant server to measure instead of local mode")
    parser.add_argument("--server-api-key", help="the Qdrant server's API key")
    parser.add_argument(
        "--server-local",
        choices=("memory", "path"),
        default="memory",
        help="without --server-url: QdrantClient(':memory:') (default) or QdrantClient(path=...) "
        "in the data folder, which also writes every point to SQLite (slower inserts, the same "
        "in-memory search)",
    )
    parser.add_argument("--queries", type=int, default=200, help="measured queries per mode")
    parser.add_argument("-k", type=int, default=5, help="results per query")
    parser.add_argument(
        "--texts",
        choices=("corpus", "synthetic"),
        default="corpus",
        help="BM25 texts: windows of the shared SEC 10-Q text (default) or synthetic words",
    )
    parser.add_argument(
        "--no-optimize",
        dest="optimize",
        action="store_false",
        help="measure Qdrant Edge without running its optimizer",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data-dir", type=Path, help="a folder for the stores, kept (default: a temporary one)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    from appliance.core.errors import ApplianceError

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    quiet_libraries()
    if args.points < 1 or args.queries < 1 or args.k < 1:
        print("--points, --queries and -k must be positive", file=sys.stderr)
        return 2
    if args.server_points is not None and args.server_points < 0:
        print("--server-points must be >= 0", file=sys.stderr)
        return 2
    if args.data_dir is not None and args.data_dir.exists() and any(args.data_dir.iterdir()):
        print(f"--data-dir {args.data_dir} is not empty", file=sys.stderr)
        return 2
    try:
        with data_folder(args.data_dir, "search-latency-") as root:
            result = run(args, root)
    except CorpusMissing as exc:
        print(f"search_latency: {exc} (or use --texts synthetic)", file=sys.stderr)
        return 2
    except ApplianceError as exc:  # a store, model or settings problem, with its fix
        print(f"search_latency: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print_json(result)
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
