"""The core service answers with the registry's active version and follows activations made
by another process, with real GGUF files in llama.cpp."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from appliance.active_model import RegistryChatModel
from appliance.chat.llamacpp import LlamaCppChatModel
from appliance.core.chat_settings import default_chat_model_path
from appliance.core.errors import ModelError
from appliance.core.protocols import GenerationParams
from finetune.registry import ModelRegistry

pytestmark = pytest.mark.slow


def load(path: Path) -> LlamaCppChatModel:
    return LlamaCppChatModel(path, n_ctx=512, n_threads=2, seed=0)


@pytest.fixture
def registry(tmp_path: Path) -> tuple[ModelRegistry, Path]:
    base = default_chat_model_path()
    copy = tmp_path / "v1.gguf"
    shutil.copyfile(base, copy)
    with copy.open("ab") as f:  # another file with another hash, that still loads
        f.write(b"\0" * 32)
    registry = ModelRegistry(tmp_path / "models")
    registry.ensure_base(base)
    version = registry.register({"gguf": {"path": str(copy)}, "gate": {"passed": True}})
    assert version == "v1"
    return registry, copy


def test_follows_an_activation_by_another_process(registry: tuple[ModelRegistry, Path]) -> None:
    reg, _copy = registry
    with RegistryChatModel(reg, load, check_every_s=0) as chat:
        assert chat.version == "base"
        first = chat.name
        ModelRegistry(reg.models_dir).activate("v1")  # e.g. `appliance models activate v1`
        answer, _ = chat.complete(
            [{"role": "user", "content": "Say hello."}], GenerationParams(max_tokens=8)
        )
        assert answer
        assert chat.version == "v1"
        assert chat.name != first
        ModelRegistry(reg.models_dir).rollback()
        assert chat.current() is not None
        assert chat.version == "base"


def test_a_changed_file_is_refused_and_the_old_model_keeps_answering(
    registry: tuple[ModelRegistry, Path],
) -> None:
    reg, copy = registry
    with RegistryChatModel(reg, load, check_every_s=0) as chat:
        ModelRegistry(reg.models_dir).activate("v1")
        with copy.open("ab") as f:  # tampered after activation, before the service loads it
            f.write(b"x")
        chat.current()
        assert chat.version == "base"
        assert chat.switch_error is not None
        assert "hash" in chat.switch_error
        with pytest.raises(ModelError):
            reg.verified_gguf("v1")
