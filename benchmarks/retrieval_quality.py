"""Retrieval quality on the shared SEC 10-Q questions: recall@5, top-1 and MRR per search mode.

Builds an index of ``../shared/eval/sec10q/docs`` with the real pipeline (parser sandbox,
chunking, the packaged MiniLM, BM25, Qdrant Edge) in a temporary folder, asks every question of
``qa.jsonl`` in dense, sparse (BM25) and hybrid mode, and scores the documents of the chunks that
come back against the question's ``evidence_doc``:

- recall@5: a gold document is among the top-5 chunks' documents;
- top-1: the first chunk's document is a gold document;
- MRR: the mean of 1 / rank of the first chunk from a gold document (0 when none is in the top 5);
- evidence_recall: the share of questions (among those whose gold answer states figures) for
  which every amount, percentage and number of the gold answer appears in the top-5 chunks'
  text, normalised by ``appliance.core.figures`` (thousands separators, "$52.9 billion" against
  "52,857" in a passage that says "in millions", rounding); figure_recall: the share of those
  figures found. This is what table handling is for: a figure is findable only where the chunk
  keeps its row, its column and its unit. Both are also printed per kind of source the golden
  set names for a question (``source_chunk_type``: "Table" or "Text"), as
  ``evidence_recall / figure_recall (questions)``.

``--tables off`` builds the index with tables written as plain page text (the setting
``ingest.tables``), for the comparison before and after table handling.

Two columns per mode: "retrieve" is what the appliance answers with (``Indexer.search``, that
is ``ingest.retrieval.retrieve``: a wider candidate list re-ranked by document, with table rows
from a second, table-only query beside it); "store only" is one store query for the top 5, the
ranking before that re-ranking. The naive baseline
(no document identity in the chunks, store only) is quoted for comparison.

``--distractors`` also runs the questions against an index that holds the 40 unrelated PDFs of
``../shared/eval/regulated`` beside the filings (one of them, a scan, cannot be indexed).
``--data-dir DIR`` keeps the built indexes in ``DIR``, one folder per build key (the code of
parsing, identity, chunking and the pipeline, the chunk settings and the model), so that a
query-side change reruns in seconds while an identity or chunking change builds afresh.
``--max-tokens``/``--overlap-tokens`` try other chunk sizes. Run from the repository root:

    .venv/bin/python benchmarks/retrieval_quality.py [--distractors] [--data-dir DIR]
        [--tables labelled|compact|off] [--json]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SEC10Q = SHARED / "eval" / "sec10q"
REGULATED = SHARED / "eval" / "regulated"
MODES = ("dense", "sparse", "hybrid")
K = 5

# The starting point, for comparison: every chunk indexed with no document identity at all,
# one store query per question (the project's measurement of a naive pipeline, hybrid mode).
NAIVE_HYBRID = {"recall@5": 0.88, "top1": 0.50}

log = logging.getLogger("retrieval_quality")


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    gold: frozenset[str]
    answer: str = ""
    source: str = ""
    """Where the gold answer was drawn from, when the golden set says ("Table", "Text")."""


@dataclass(frozen=True)
class Scores:
    mode: str
    questions: int
    recall_at_5: float
    top1: float
    mrr: float
    evidence_recall: float = 0.0
    figure_recall: float = 0.0
    questions_with_figures: int = 0
    evidence_by_source: dict[str, dict[str, float]] | None = None
    """evidence_recall and figure_recall of the questions drawn from each kind of source."""


def load_questions(path: Path) -> list[Question]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            out.append(
                Question(
                    record["id"],
                    record["question"],
                    frozenset(record["evidence_doc"]),
                    record.get("answer", ""),
                    str(record.get("source_chunk_type") or ""),
                )
            )
    return out


def document_name(path: str) -> str:
    """The file name of an indexed path: gold documents are named without their folder."""
    return path.rsplit("/", 1)[-1]


NUMERIC_KINDS = ("amount", "percent", "number")


def figures_found(answer: str, passages: Sequence[str]) -> tuple[int, int]:
    """(figures of ``answer`` that some passage states, figures of ``answer``): amounts,
    percentages and numbers only (dates, years and identifiers such as "Q3" are in nearly
    every chunk of a filing and say nothing about evidence)."""
    from appliance.core.figures import extract_figures, find_figure

    figures = [f for f in extract_figures(answer) if f.kind in NUMERIC_KINDS]
    extracted = [(p, extract_figures(p)) for p in passages]
    found = sum(1 for f in figures if any(find_figure(f, p, figures=fs) for p, fs in extracted))
    return found, len(figures)


def score(
    mode: str,
    ranked: Sequence[Sequence[str]],
    questions: Sequence[Question],
    texts: Sequence[Sequence[str]] | None = None,
) -> Scores:
    """Scores of ranked document paths (one list per question, best chunk first) and, given
    the chunks' texts, of the evidence they hold."""
    recall = top1 = rr = 0.0
    for docs, q in zip(ranked, questions, strict=True):
        names = [document_name(d) for d in docs[:K]]
        recall += any(n in q.gold for n in names)
        top1 += bool(names) and names[0] in q.gold
        rr += next((1 / rank for rank, n in enumerate(names, 1) if n in q.gold), 0.0)
    n = len(questions) or 1
    complete = found = stated = with_figures = 0
    by_source: dict[str, list[int]] = {}
    for passages, q in zip(texts or [], questions, strict=False):
        hit, total = figures_found(q.answer, passages[:K])
        if total:
            with_figures += 1
            complete += hit == total
            found += hit
            stated += total
            if q.source:
                tally = by_source.setdefault(q.source, [0, 0, 0, 0])
                tally[0] += 1
                tally[1] += hit == total
                tally[2] += hit
                tally[3] += total
    return Scores(
        mode,
        len(questions),
        recall / n,
        top1 / n,
        rr / n,
        evidence_recall=complete / (with_figures or 1),
        figure_recall=found / (stated or 1),
        questions_with_figures=with_figures,
        evidence_by_source={
            source: {
                "questions": q_n,
                "evidence_recall": q_complete / q_n,
                "figure_recall": f_found / (f_total or 1),
            }
            for source, (q_n, q_complete, f_found, f_total) in sorted(by_source.items())
        }
        or None,
    )


def evaluate(searcher: Any, questions: Sequence[Question], mode: str) -> Scores:
    """Ask every question of an ``Indexer`` (``search(query, k, mode=...)``) and score it."""
    from ingest.retrieval import search

    ranked, texts = [], []
    for q in questions:
        hits = search(searcher, q.question, K, mode=mode)
        ranked.append([str(h["path"]) for h in hits])
        texts.append([str(h["text"]) for h in hits])
    return score(mode, ranked, questions, texts)


def evaluate_store(searcher: Any, questions: Sequence[Question], mode: str) -> Scores:
    """The same, ranked by the store alone: one query for the top ``K`` chunks, as retrieval
    did before ``ingest.retrieval`` re-ranked a wider candidate list."""
    ranked = []
    for q in questions:
        dense = searcher.embedder.embed_query(q.question) if mode != "sparse" else None
        lexical = searcher.sparse.embed_query(q.question) if mode != "dense" else None
        hits = searcher.store.query(dense, lexical, K, mode=mode)
        ranked.append([str(h.payload.get("path")) for h in hits])
    return score(mode, ranked, questions)


def _code_fingerprint(path: Path) -> str:
    """The syntax tree of a module without its docstrings: comments, docstrings and formatting
    do not change it, code does."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            node.body = [  # type: ignore[attr-defined]
                stmt
                for stmt in body
                if not (
                    isinstance(stmt, ast.Expr)
                    and isinstance(stmt.value, ast.Constant)
                    and isinstance(stmt.value.value, str)
                )
            ] or [ast.Pass()]
    return ast.dump(tree)


def build_key(settings: Any, embedder: Any) -> str:
    """Names what an index depends on besides the files: the code that turns a file into
    chunk texts, the chunking settings and the model. A cached index is reused only for the
    same key (reconciling alone would keep stale identity lines of unchanged files)."""
    digest = hashlib.sha256()
    for module in ("identity", "chunking", "pipeline", "parsers", "pdf_tables", "tables"):
        digest.update(_code_fingerprint(REPO / "ingest" / f"{module}.py").encode())
    digest.update(settings.chunking.model_dump_json().encode())
    digest.update(f"tables={settings.ingest.tables},{settings.ingest.table_rows}".encode())
    digest.update(embedder.model_id.encode())
    return digest.hexdigest()[:12]


def _sync_copy(sources: Sequence[tuple[Path, str]], docs: Path) -> None:
    """Make ``docs`` hold exactly the given files (source, relative path), copying only what
    differs, so that a cached index sees unchanged files."""
    wanted = {rel: src for src, rel in sources}
    for path in sorted(docs.rglob("*"), reverse=True):
        rel = path.relative_to(docs).as_posix()
        if path.is_file() and rel not in wanted:
            path.unlink()
    for rel, src in wanted.items():
        dst = docs / rel
        stat = src.stat()
        if dst.is_file() and (dst.stat().st_size, dst.stat().st_mtime_ns) == (
            stat.st_size,
            stat.st_mtime_ns,
        ):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def corpus_files(distractors: bool) -> list[tuple[Path, str]]:
    """The filings at the top level, and with ``distractors`` the regulated PDFs in folders."""
    files = [(p, p.name) for p in sorted((SEC10Q / "docs").glob("*.pdf"))]
    if distractors:
        files += [(p, f"{p.parent.name}/{p.name}") for p in sorted(REGULATED.glob("*/*.pdf"))]
    return files


def benchmark_settings(
    root: Path, chunking: Mapping[str, int] | None = None, *, tables: str = "labelled"
) -> Any:
    """Default settings (no YAML, no environment) with the data and documents under ``root``."""
    from appliance.core.settings import load_settings

    return load_settings(
        env={},
        overrides={
            "data_dir": str(root / "data"),
            "ingest": {
                "docs_dir": str(root / "docs"),
                "reconcile_interval_s": 0,
                "tables": tables != "off",
                **({"table_rows": tables} if tables in ("labelled", "compact") else {}),
            },
            "chunking": dict(chunking or {}),
        },
    )


@contextmanager
def built_index(
    root: Path,
    files: Sequence[tuple[Path, str]],
    *,
    embedder: Any = None,
    chunking: Mapping[str, int] | None = None,
    tables: str = "labelled",
) -> Iterator[tuple[Any, Any]]:
    """An ``Ingestion`` over a copy of ``files`` in ``root/docs``, its data in ``root/data``,
    indexed up to date (an existing index there is reused and brought up to date), and the
    ``IngestReport`` of that scan (files that cannot be indexed are in its ``failures``).
    ``chunking`` overrides chunking settings (``max_tokens``, ``overlap_tokens``)."""
    from appliance.wiring import open_ingestion

    settings = benchmark_settings(root, chunking, tables=tables)
    docs = settings.ingest.docs_dir
    docs.mkdir(parents=True, exist_ok=True)
    _sync_copy(files, docs)
    with open_ingestion(settings, docs, role="benchmark", embedder=embedder) as ing:
        start = time.monotonic()
        report = ing.indexer.reconcile(confirm_deletions=True)
        for failure in report.failures:
            log.warning("not indexed: %s (%s)", failure["path"], failure["reason"])
        log.info(
            "indexed %s in %.0f s (%d added, %d updated, %d unchanged, %d chunks)",
            root.name,
            time.monotonic() - start,
            report.added,
            report.updated,
            report.unchanged,
            report.chunks,
        )
        yield ing, report


def run(
    data_dir: Path,
    *,
    distractors: bool,
    chunking: Mapping[str, int] | None = None,
    tables: str = "labelled",
) -> dict[str, Any]:
    """Build (or reuse) the indexes under ``data_dir`` and score every mode."""
    from ingest.embedders import SentenceTransformerEmbedder

    questions = load_questions(SEC10Q / "qa.jsonl")
    embedder = SentenceTransformerEmbedder()
    settings = benchmark_settings(data_dir, chunking, tables=tables)
    key = build_key(settings, embedder)
    variants = {"sec10q": False, **({"sec10q+distractors": True} if distractors else {})}
    results: dict[str, Any] = {
        "questions": len(questions),
        "k": K,
        "chunking": settings.chunking.model_dump(),
        "tables": tables,
        "naive_hybrid": NAIVE_HYBRID,
    }
    for name, with_distractors in variants.items():
        files = corpus_files(with_distractors)
        root = data_dir / f"{name}-{key}"
        with built_index(root, files, embedder=embedder, chunking=chunking, tables=tables) as (
            ing,
            report,
        ):
            chunks = ing.indexer.store.count()
            start = time.monotonic()
            scores = [evaluate(ing.searcher, questions, mode) for mode in MODES]
            seconds = time.monotonic() - start
            store_scores = [evaluate_store(ing.searcher, questions, mode) for mode in MODES]
        results[name] = {
            "documents": len(files),
            "failed": report.failures,
            "chunks": chunks,
            "query_ms": round(1000 * seconds / (len(MODES) * len(questions)), 1),
            "modes": {s.mode: asdict(s) for s in scores},
            "store_only": {s.mode: asdict(s) for s in store_scores},
        }
    return results


def print_table(results: dict[str, Any]) -> None:
    naive = results["naive_hybrid"]
    chunking = results["chunking"]
    print(
        f"chunks of {chunking['max_tokens']} tokens, {chunking['overlap_tokens']} overlapping; "
        f"a hit is a chunk of a gold document among the top {results['k']}; "
        f"tables: {results.get('tables')}"
    )
    for name, variant in results.items():
        if not isinstance(variant, dict) or "modes" not in variant:
            continue
        failed = f", {len(variant['failed'])} not indexed" if variant["failed"] else ""
        print(
            f"\n{name}: {variant['documents']} documents{failed}, {variant['chunks']} chunks, "
            f"{results['questions']} questions, {variant['query_ms']} ms per retrieval"
        )
        print(f"  {'':<8} {'retrieve (re-ranked)':^26}   {'store only (top 5)':^26}")
        print(
            f"  {'mode':<8} {'recall@5':>9} {'top-1':>7} {'MRR':>7}   "
            f"{'recall@5':>9} {'top-1':>7} {'MRR':>7}"
        )
        for mode, s in variant["modes"].items():
            b = variant["store_only"][mode]
            print(
                f"  {mode:<8} {s['recall_at_5']:>9.3f} {s['top1']:>7.3f} {s['mrr']:>7.3f}   "
                f"{b['recall_at_5']:>9.3f} {b['top1']:>7.3f} {b['mrr']:>7.3f}"
            )
        print(
            f"  evidence (retrieve, {variant['modes']['hybrid']['questions_with_figures']} "
            "questions whose gold answer states figures):"
        )
        for mode, s in variant["modes"].items():
            sources = "".join(
                f"   {name}: {b['evidence_recall']:.3f} / {b['figure_recall']:.3f} "
                f"({b['questions']})"
                for name, b in (s.get("evidence_by_source") or {}).items()
            )
            print(
                f"  {mode:<8} evidence_recall {s['evidence_recall']:.3f}   "
                f"figure_recall {s['figure_recall']:.3f}{sources}"
            )
        print(
            f"  naive hybrid (no identity, store only): recall@5 {naive['recall@5']:.2f}, "
            f"top-1 {naive['top1']:.2f}"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="keep the built indexes here and reuse them (default: a temporary folder)",
    )
    parser.add_argument(
        "--distractors",
        action="store_true",
        help="also score an index with the 40 PDFs of ../shared/eval/regulated added",
    )
    parser.add_argument(
        "--max-tokens", type=int, help="chunk size in model tokens (default: the settings')"
    )
    parser.add_argument(
        "--overlap-tokens", type=int, help="chunk overlap in model tokens (default: the settings')"
    )
    parser.add_argument(
        "--tables",
        choices=("labelled", "compact", "off"),
        default="labelled",
        help="how tables are written (the settings ingest.table_rows; off: ingest.tables "
        "false, tables as plain page text, the comparison before table handling)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("-v", "--verbose", action="store_true", help="log indexing progress")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not (SEC10Q / "qa.jsonl").is_file() or not (SEC10Q / "docs").is_dir():
        print(
            f"the evaluation corpus is absent: expected {SEC10Q}/docs and qa.jsonl "
            "(the shared folder beside the repository)",
            file=sys.stderr,
        )
        return 2
    if args.distractors and not REGULATED.is_dir():
        print(f"--distractors needs {REGULATED}, which is absent", file=sys.stderr)
        return 2
    os.environ.setdefault("TQDM_DISABLE", "1")
    from appliance.core.settings import load_settings
    from appliance.wiring import prepare_process

    prepare_process(load_settings(env={}))
    chunking = {
        name: value
        for name, value in (
            ("max_tokens", args.max_tokens),
            ("overlap_tokens", args.overlap_tokens),
        )
        if value is not None
    }
    tables = args.tables
    if args.data_dir is not None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        results = run(args.data_dir, distractors=args.distractors, chunking=chunking, tables=tables)
    else:
        with tempfile.TemporaryDirectory(prefix="retrieval-quality-") as tmp:
            results = run(Path(tmp), distractors=args.distractors, chunking=chunking, tables=tables)
    if args.json:
        sys.stdout.write(json.dumps(results) + "\n")
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
