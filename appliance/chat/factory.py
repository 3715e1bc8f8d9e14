"""The chat model the settings describe; the composition root (``appliance.wiring``) and the
commands that load a candidate GGUF build models through here, never a backend directly."""

from __future__ import annotations

from pathlib import Path

from appliance.chat.base import BaseChatModel
from appliance.chat.llamacpp import LlamaCppChatModel
from appliance.chat.servers import OllamaChatModel, OpenAICompatibleChatModel
from appliance.core.chat_settings import ChatSettings, default_chat_model_path
from appliance.core.errors import ConfigError
from appliance.core.protocols import GenerationParams


def llamacpp_chat_model(chat: ChatSettings, path: Path) -> LlamaCppChatModel:
    """A GGUF in llama.cpp with the settings' context, threads and generation defaults (the
    configured model, a registry version, or a candidate under evaluation): the continuous-
    batching engine, or the serial one with ``chat.parallel: 1``."""
    params = GenerationParams(
        max_tokens=chat.max_tokens, temperature=chat.temperature, seed=chat.seed
    )
    if chat.parallel != 1:
        from appliance.chat.batching import BatchedLlamaCppChatModel

        return BatchedLlamaCppChatModel(
            path,
            slots=chat.parallel,
            n_ctx=chat.n_ctx,
            n_threads=chat.n_threads,
            seed=chat.seed,
            prefill_chunk=chat.prefill_chunk,
            prefix_cache_bytes=None if chat.prefix_cache_mb is None else chat.prefix_cache_mb << 20,
            default_params=params,
        )
    return LlamaCppChatModel(
        path, n_ctx=chat.n_ctx, n_threads=chat.n_threads, seed=chat.seed, default_params=params
    )


def build_chat_model(chat: ChatSettings) -> BaseChatModel:
    """The chat model the settings describe (loads a local model; servers are not contacted)."""
    params = GenerationParams(
        max_tokens=chat.max_tokens, temperature=chat.temperature, seed=chat.seed
    )
    if chat.backend == "llamacpp":
        path = chat.model_path or default_chat_model_path()
        if not path.is_file():
            raise ConfigError(
                f"chat.model_path (APPLIANCE_CHAT__MODEL_PATH) is {str(path)!r}, which is not a "
                "file; point it at a local GGUF file, or leave it empty for the packaged SmolLM2"
            )
        return llamacpp_chat_model(chat, path)
    example = "http://127.0.0.1:11434" if chat.backend == "ollama" else "http://127.0.0.1:8000"
    if not chat.url:
        raise ConfigError(
            f"chat.backend={chat.backend} needs the server's address: set chat.url "
            f"(APPLIANCE_CHAT__URL), e.g. {example}"
        )
    if not chat.model:
        raise ConfigError(
            f"chat.backend={chat.backend} needs the model's name on the server: set chat.model "
            "(APPLIANCE_CHAT__MODEL)"
        )
    if chat.backend == "ollama":
        return OllamaChatModel(
            chat.url, chat.model, timeout=chat.timeout_s, n_ctx=chat.n_ctx, default_params=params
        )
    return OpenAICompatibleChatModel(
        chat.url,
        chat.model,
        api_key=chat.api_key,
        timeout=chat.timeout_s,
        n_ctx=chat.n_ctx,
        default_params=params,
    )


def smoke_chat_model(path: Path, n_threads: int) -> LlamaCppChatModel:
    """A GGUF in a small context with a fixed seed: enough to prove an exported file serves."""
    return LlamaCppChatModel(path, n_ctx=512, n_threads=n_threads, seed=0)
