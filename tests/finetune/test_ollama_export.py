"""The Ollama export: the Modelfile, and model creation through the ``ollama`` client.

No Ollama server exists on this machine (none is packaged on the registries we reach). The
client is run against a small HTTP server on 127.0.0.1 that records what Ollama would receive
(the blob upload and the create request); whether a real Ollama accepts them is not tested here.
The GGUF the Modelfile points to is the packaged default model, which llama.cpp (Ollama's
engine) loads in the other tests.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from appliance.cli import main
from appliance.core.chat_settings import default_chat_model_path
from appliance.core.errors import ModelError
from appliance.core.settings import load_settings
from finetune import ollama_export as ox
from finetune.registry import ModelRegistry

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
)


@dataclass
class FakeOllama:
    url: str
    requests: list[tuple[str, str, Any]] = field(default_factory=list)
    blobs: dict[str, bytes] = field(default_factory=dict)
    refuse: str | None = None


@pytest.fixture
def fake_ollama() -> Iterator[FakeOllama]:
    """A real HTTP server on 127.0.0.1 answering Ollama's blob and create endpoints."""
    fake = FakeOllama(url="")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                parts = []
                while size := int(self.rfile.readline().strip() or b"0", 16):
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(parts)
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_POST(self) -> None:
            raw = self._body()
            if self.path.startswith("/api/blobs/"):
                digest = self.path.rsplit("/", 1)[1]
                fake.requests.append(("POST", self.path, len(raw)))
                if digest != "sha256:" + hashlib.sha256(raw).hexdigest():
                    self._reply(400, {"error": "digest mismatch"})
                    return
                fake.blobs[digest] = raw
                self._reply(201, {})
            elif self.path == "/api/create":
                body = json.loads(raw)
                fake.requests.append(("POST", self.path, body))
                missing = [d for d in body.get("files", {}).values() if d not in fake.blobs]
                if missing or fake.refuse:
                    self._reply(400, {"error": fake.refuse or f"blob {missing[0]} not found"})
                    return
                self._reply(200, {"status": "success"})
            else:
                self._reply(404, {"error": "not found"})

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield fake
    server.shutdown()
    server.server_close()


def small_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "model-Q4_K_M.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    return path


def test_chatml_modelfile(tmp_path: Path) -> None:
    gguf = small_gguf(tmp_path)
    rec = {"version": "v3", "gguf": {"path": str(gguf)}}
    path = ox.write_modelfile(rec, tmp_path / "out", "Answer from the context.", SMOLLM2_TEMPLATE)
    text = path.read_text()
    assert f"FROM {gguf}\n" in text
    assert 'TEMPLATE """' + ox.CHATML_GO_TEMPLATE + '"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """Answer from the context."""' in text
    back = ox.parse_modelfile(path)
    assert back.gguf == gguf
    assert back.template == ox.CHATML_GO_TEMPLATE
    assert back.stops == list(ox.CHATML_STOPS)
    assert back.system == "Answer from the context."


def test_unknown_template_family_relies_on_the_gguf(tmp_path: Path) -> None:
    rec = {"version": "v1", "gguf": {"path": str(small_gguf(tmp_path))}}
    text = ox.write_modelfile(rec, tmp_path, None, LLAMA3_TEMPLATE).read_text()
    assert "TEMPLATE" not in text.replace("# The chat template", "")
    assert "uses the template embedded in the GGUF" in text
    assert 'PARAMETER stop "<|eot_id|>"' in text
    assert "SYSTEM" not in text


def test_template_is_read_from_the_packaged_gguf(tmp_path: Path) -> None:
    gguf = default_chat_model_path()
    assert ox.template_family(ox.gguf_chat_template(gguf)) == "chatml"
    model = ox.model_for({"version": "base", "gguf": {"path": str(gguf)}}, "Be brief.")
    assert model.template == ox.CHATML_GO_TEMPLATE


def test_create_in_ollama_uploads_the_blob_then_creates(
    tmp_path: Path, fake_ollama: FakeOllama
) -> None:
    gguf = small_gguf(tmp_path)
    rec = {"version": "v2", "gguf": {"path": str(gguf)}}
    modelfile = ox.write_modelfile(rec, tmp_path, "Cite sources.", SMOLLM2_TEMPLATE)
    assert ox.create_in_ollama(fake_ollama.url, "appliance:v2", modelfile) == "appliance:v2"
    digest = "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
    (blob_method, blob_path, size), (_, create_path, body) = fake_ollama.requests
    assert (blob_method, blob_path, size) == ("POST", f"/api/blobs/{digest}", gguf.stat().st_size)
    assert create_path == "/api/create"
    assert body["model"] == "appliance:v2"
    assert body["files"] == {gguf.name: digest}
    assert body["template"] == ox.CHATML_GO_TEMPLATE
    assert body["system"] == "Cite sources."
    assert body["parameters"] == {"stop": list(ox.CHATML_STOPS)}


def test_unreachable_ollama_is_a_model_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rec = {"version": "v1", "gguf": {"path": str(small_gguf(tmp_path))}}
    with pytest.raises(ModelError, match="cannot reach the Ollama server"):
        ox.create_in_ollama(f"http://127.0.0.1:{port}", "t:1", rec, template_source="x")


def test_refusal_is_a_model_error(tmp_path: Path, fake_ollama: FakeOllama) -> None:
    fake_ollama.refuse = "unsupported architecture"
    model = ox.OllamaModel(gguf=small_gguf(tmp_path), template=None)
    with pytest.raises(ModelError, match=r"refused to create 't:1': unsupported architecture"):
        ox.create_in_ollama(fake_ollama.url, "t:1", model)


def test_export_ollama_command(
    capsys: pytest.CaptureFixture[str], hermetic_env: Path, fake_ollama: FakeOllama
) -> None:
    settings = load_settings()
    reg = ModelRegistry(settings.models_dir)
    reg.ensure_base(default_chat_model_path())
    # A real GGUF (a copy of the packaged model): the command reads its chat template.
    gguf = hermetic_env / "v1.Q4_1.gguf"
    shutil.copyfile(default_chat_model_path(), gguf)
    reg.register({"gguf": {"path": str(gguf)}, "gate": {"passed": True, "metrics": {}}})

    code = main(["models", "export-ollama", "v1", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["tag"] is None
    assert Path(result["modelfile"]) == settings.models_dir / "ollama" / "v1" / "Modelfile"

    code = main(["models", "export-ollama", "v1", "--url", fake_ollama.url, "--tag", "dom:v1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "created dom:v1" in out
    assert reg.get("v1")["ollama_tag"] == "dom:v1"
    create = fake_ollama.requests[-1][2]
    assert create["model"] == "dom:v1"
    assert create["system"], "the appliance's system prompt travels with the model"
    assert create["template"] == ox.CHATML_GO_TEMPLATE

    with gguf.open("ab") as f:
        f.write(b"!")
    code = main(["models", "export-ollama", "v1"])
    _, err = capsys.readouterr()
    assert code == 1
    assert "trusted only by hash" in err
