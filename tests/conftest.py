"""Shared fixtures: hermetic settings, a network guard, and tiny real components."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.core.offline import enforce_offline
from appliance.core.settings import ChunkingSettings, IngestSettings, Settings, load_settings

SHARED = Path(__file__).resolve().parents[2] / "shared"
SEC10Q = SHARED / "eval" / "sec10q"


def pytest_configure(config: pytest.Config) -> None:
    # Any attempt to reach a non-loopback address fails the test that made it.
    enforce_offline()


@pytest.fixture(autouse=True)
def hermetic_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No APPLIANCE_* variable leaks in; the data folder is the test's own."""
    for name in list(os.environ):
        if name.startswith("APPLIANCE_"):
            monkeypatch.delenv(name)
    data = tmp_path / "data"
    monkeypatch.setenv("APPLIANCE_DATA_DIR", str(data))
    return data


@pytest.fixture(autouse=True)
def restore_umask() -> Iterator[None]:
    """`appliance.cli.main` tightens the process umask (as the product should); tests that
    call it in-process must not pass that on to the tests after them."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(
        overrides={
            "data_dir": str(tmp_path / "data"),
            "ingest": {
                "docs_dir": str(tmp_path / "docs"),
                "debounce_s": 0.3,
                "reconcile_interval_s": 0,
            },
            "service": {"port": 0},
        }
    )


@pytest.fixture(scope="session")
def real_embedder():  # type: ignore[no-untyped-def]
    """The packaged all-MiniLM-L6-v2, loaded once per session."""
    from ingest.embedders import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder()


@pytest.fixture(scope="session")
def sec10q_docs() -> Path:
    docs = SEC10Q / "docs"
    if not docs.is_dir():
        pytest.skip(
            f"the shared corpus is absent ({docs}); it lives beside the project in ../shared"
        )
    return docs


def small_settings() -> tuple[IngestSettings, ChunkingSettings]:
    return (
        IngestSettings(debounce_s=0.3, reconcile_interval_s=0, mass_delete_min_files=10),
        ChunkingSettings(max_tokens=64, overlap_tokens=8),
    )


@pytest.fixture
def make_indexer(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """Build real indexers (Qdrant Edge, SQLite state, the parser sandbox) over a folder, with
    the hashing embedder unless one is given; everything is closed at teardown."""
    from ingest.embedders import Bm25Encoder
    from ingest.parsers import supported_suffixes
    from ingest.pipeline import Indexer
    from ingest.sandbox import ParserSandbox
    from ingest.state import IngestState
    from ingest.store import EdgeBackend
    from tests.embedders import HashingEmbedder

    opened: list = []  # type: ignore[type-arg]

    def build(
        docs: Path,
        *,
        embedder=None,
        data: Path | None = None,
        collection: str = "appliance_test",
        ingest: IngestSettings | None = None,
    ):  # type: ignore[no-untyped-def]
        data = data or tmp_path / "data"
        ing, chunking = small_settings()
        state = IngestState(data / "ingest.sqlite3")
        backend = EdgeBackend(data / "index")
        sandbox = ParserSandbox(timeout_s=30, memory_mb=1024, max_text_chars=5_000_000)
        opened.extend([sandbox, backend, state])
        embedder = embedder or HashingEmbedder(64)
        indexer = Indexer(
            docs_dir=docs,
            state=state,
            store=backend.open(collection, embedder.dim),
            embedder=embedder,
            sparse=Bm25Encoder(),
            parser=sandbox,
            suffixes=supported_suffixes(),
            ingest=ingest or ing,
            chunking=chunking,
            staging=sandbox.staging,
        )
        indexer.recover()
        return indexer

    yield build
    for resource in opened:
        resource.close()


@pytest.fixture(scope="session")
def sec10q_ingestion(tmp_path_factory: pytest.TempPathFactory, sec10q_docs: Path, real_embedder):  # type: ignore[no-untyped-def]
    """The 12 sec10q filings indexed once per session with the default settings and model."""
    from appliance.wiring import open_ingestion

    data = tmp_path_factory.mktemp("sec10q-data")
    settings = load_settings(env={}, overrides={"data_dir": str(data), "chat": {"n_threads": 2}})
    ingestion = open_ingestion(settings, sec10q_docs, role="tests", embedder=real_embedder)
    report = ingestion.indexer.reconcile()
    assert report.failed == 0, report.failures
    yield ingestion
    ingestion.close()


@pytest.fixture(scope="session")
def sec10q_answerer(sec10q_ingestion):  # type: ignore[no-untyped-def]
    """The answering engine over the sec10q index with the default chat model (llama.cpp)."""
    from appliance.wiring import build_answerer

    return build_answerer(sec10q_ingestion.settings, sec10q_ingestion)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests skip, saying why, where torch sees no CUDA device."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    try:
        import torch

        reason = None if torch.cuda.is_available() else "no CUDA device (torch sees none)"
    except ImportError:
        reason = "torch is not installed"
    if reason is not None:
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason=f"gpu test: {reason}"))
