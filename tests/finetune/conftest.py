"""Fixtures of the fine-tuning tests: the real default model as a Hugging Face base folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from appliance.core.errors import ConfigError


@pytest.fixture(scope="session")
def hf_base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged SmolLM2 GGUF dequantized once into pytest's cache folder (about 30 s the
    first time; later sessions reuse it, since the folder name is the GGUF's digest)."""
    from appliance.core.chat_settings import default_chat_model_path
    from finetune.base_model import ensure_hf_base

    try:
        source = default_chat_model_path()
    except ConfigError as exc:
        pytest.skip(f"the default chat model is not installed: {exc}")
    # Without pytest's cache (-p no:cacheprovider) the base is rebuilt once per session.
    cache_plugin = getattr(request.config, "cache", None)
    cache = (
        Path(cache_plugin.mkdir("finetune-bases"))
        if cache_plugin is not None
        else tmp_path_factory.mktemp("finetune-bases")
    )
    return ensure_hf_base(source, cache)


@pytest.fixture(scope="session")
def hf_tokenizer(hf_base: Path) -> Any:
    from finetune.modeling import load_tokenizer

    return load_tokenizer(hf_base)


def write_dataset(
    folder: Path,
    records: list[dict[str, Any]],
    preferences: list[dict[str, Any]] | None = None,
) -> Path:
    """A dataset folder in the format the dataset builder writes."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"messages": r["messages"]}) + "\n" for r in records)
    (folder / "train.jsonl").write_text(lines, encoding="utf-8")
    if preferences is not None:
        prefs = "".join(json.dumps(p) + "\n" for p in preferences)
        (folder / "preferences.jsonl").write_text(prefs, encoding="utf-8")
    (folder / "manifest.json").write_text(
        json.dumps({"sha256": f"test-{len(records)}"}), encoding="utf-8"
    )
    return folder
