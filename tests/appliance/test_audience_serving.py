"""Audience-aware serving: each reader is answered by the registry version whose training
collections they may all read, else the newest such version, else the base; loaded models are
bounded, and a model stays open while an answer uses it. The registry is real; the loader is
the seam (a scripted model per GGUF: loading real ones is covered by test_active_model.py and
the end-to-end test in tests/finetune/test_audience_e2e.py)."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import pytest

from appliance.active_model import RegistryChatModel
from appliance.chat.base import BaseChatModel, Usage
from appliance.core.audience import audience_of, candidates, choose, may_use, readable_of
from appliance.core.errors import ModelError
from appliance.core.protocols import ChatMessage, GenerationParams
from finetune.registry import ModelRegistry


class Named(BaseChatModel):
    """Answers with the name of the GGUF it was loaded from."""

    loaded: list[str] = []  # noqa: RUF012 (a log shared by the test)

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._name = path.name
        Named.loaded.append(path.name)

    @property
    def name(self) -> str:
        return self._name

    @property
    def context_length(self) -> int:
        return 512

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def _generate(
        self, messages: list[ChatMessage], params: GenerationParams
    ) -> Generator[str, None, Usage]:
        yield self._name
        return Usage(self._name, 1, 1, "stop")

    def _close(self) -> None:
        pass


def gguf(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_bytes(b"GGUF" + name.encode() * 8)
    return path


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    """base; v1 on hr (passed, activated later by the tests); v2 on the shared documents;
    v3 on legal, its gate failed; v4 of unknown audience (registered before audiences)."""
    Named.loaded = []
    reg = ModelRegistry(tmp_path / "models")
    reg.ensure_base(gguf(tmp_path, "base.gguf"))
    for name, audience, passed in (
        ("v1.gguf", ["hr", ""], True),
        ("v2.gguf", [""], True),
        ("v3.gguf", ["legal"], False),
        ("v4.gguf", None, True),
    ):
        record = {"gguf": {"path": str(gguf(tmp_path, name))}, "gate": {"passed": passed}}
        if audience is not None:
            record["audience"] = audience
        reg.register(record)
    return reg


def served(chat: RegistryChatModel, readable: set[str] | None) -> str:
    model = chat.serve(None if readable is None else frozenset(readable))
    try:
        text, _ = model.complete([{"role": "user", "content": "hi"}])
        assert text == model.name
        assert model.served_by["name"] == model.name
        return str(model.served_by["version"])
    finally:
        model.close()


def test_the_rules() -> None:
    assert may_use(frozenset({"hr"}), None)  # the host's operators may use every version
    assert may_use(None, None)
    assert not may_use(None, frozenset({"", "hr"}))  # unknown: only the operators
    assert may_use(frozenset(), frozenset({""}))
    assert not may_use(frozenset({"", "hr"}), frozenset({"", "legal"}))
    assert readable_of({"collection": ["", "hr"]}) == {"", "hr"}
    assert readable_of(None) is None
    assert audience_of({"version": "base"}) == frozenset()
    assert audience_of({"version": "v9"}) is None
    assert audience_of({"version": "v9", "audience": ["b", "a", "a"]}) == {"a", "b"}


def test_serving_order_skips_failed_gates_and_rollbacks(registry: ModelRegistry) -> None:
    order = [r["version"] for r in registry.serving_order()]
    assert order == ["base", "v4", "v2", "v1"]  # the active base first; v3 failed its gate
    registry.activate("v1")
    registry.activate("v2")
    assert [r["version"] for r in registry.serving_order()] == ["v2", "v4", "v1", "base"]
    registry.rollback()  # v2 was rejected by an admin: never a fallback again
    assert [r["version"] for r in registry.serving_order()] == ["v1", "v4", "base"]
    registry.activate("v3", force=True)  # forced: an admin accepted it
    assert [r["version"] for r in registry.serving_order()][:2] == ["v3", "v4"]
    order = candidates(registry.serving_order())
    assert choose(order, frozenset({"", "legal"})).version == "v3"  # type: ignore[union-attr]
    assert choose(order, frozenset({"", "hr"})).version == "v1"  # type: ignore[union-attr]
    assert choose(order, frozenset({""})).version == "base"  # type: ignore[union-attr]


def test_each_reader_gets_a_version_they_may_use(registry: ModelRegistry) -> None:
    registry.activate("v1")  # trained on hr and the shared documents
    with RegistryChatModel(registry, Named, check_every_s=0) as chat:
        assert chat.version == "v1"
        assert served(chat, None) == "v1"  # the host's operators: the active version
        assert served(chat, {"", "hr"}) == "v1"
        assert served(chat, {"", "hr", "legal"}) == "v1"
        # not granted hr: the newest version they may use (v4's audience is unknown)
        assert served(chat, {"", "legal"}) == "v2"
        assert served(chat, {""}) == "v2"
        ModelRegistry(registry.models_dir).activate("v4")
        assert served(chat, {"", "hr", "legal"}) == "v2"  # v4 may have learned anything
        assert served(chat, None) == "v4"


def test_at_most_max_loaded_models_and_the_active_one_stays(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    registry.activate("v1")
    extra = registry.register(
        {"gguf": {"path": str(gguf(tmp_path, "v5.gguf"))}, "audience": ["ops"]}
    )
    with RegistryChatModel(registry, Named, check_every_s=0, max_loaded=2) as chat:
        assert served(chat, {"", "ops"}) == extra
        assert chat.loaded_versions() == ["v1", extra]
        held = chat.serve(frozenset({"", "ops"}))  # an answer in flight on v5
        assert served(chat, {""}) == "v2"  # v5 is unloaded, but stays open while used
        assert chat.loaded_versions() == ["v1", "v2"]
        text, _ = held.complete([{"role": "user", "content": "still there?"}])
        assert text == "v5.gguf"
        held.close()
        assert served(chat, {"", "hr"}) == "v1"
        assert "v1" in chat.loaded_versions()


def test_a_changed_file_falls_back_to_the_next_allowed_version(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    registry.activate("v2")
    with RegistryChatModel(registry, Named, check_every_s=0) as chat:
        ModelRegistry(registry.models_dir).activate("v1")
        with (tmp_path / "v1.gguf").open("ab") as f:
            f.write(b"tampered")
        assert served(chat, {"", "hr"}) == "v2"  # v1 is refused by hash; v2 is allowed
        assert chat.version == "v2"
        assert chat.switch_error is not None
        assert "hash" in chat.switch_error
        ModelRegistry(registry.models_dir).activate("v4")
        assert served(chat, {""}) == "v2"  # loaded and checked already: kept
    (tmp_path / "base.gguf").write_bytes(b"gone")
    (tmp_path / "v2.gguf").write_bytes(b"gone")
    with RegistryChatModel(registry, Named, check_every_s=0) as fresh:
        assert served(fresh, None) == "v4"
        with pytest.raises(ModelError, match="no model version this user may be answered by"):
            served(fresh, {""})
