"""The parser process is confined (ingest.confine): it cannot open the data folder, the
configuration or the documents folder, cannot make a TCP or UDP socket, and starts with an
empty environment; it can read only its staging copies. A real worker, a real TCP server."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.confine import landlock_abi
from ingest.sandbox import ParserSandbox

pytestmark = pytest.mark.integration


@pytest.fixture
def listener() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


def test_a_parser_cannot_reach_the_data_folder_or_the_network(
    tmp_path: Path, listener: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    token = data / "service.token"
    token.write_text("secret-token")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("a document")
    monkeypatch.setenv("APPLIANCE_SECRET_FOR_TEST", "must-not-leak")
    with ParserSandbox(timeout_s=20, memory_mb=1024, max_text_chars=1000) as sandbox:
        staged = sandbox.staging.folder / "copy.txt"
        staged.write_text("a staged copy")
        assert sandbox.parse(staged).sections[0].text == "a staged copy"
        seen = sandbox.check(
            read=[str(token), str(docs / "a.txt"), str(staged), "/proc/self/environ"],
            connect=[("127.0.0.1", listener)],
        )
    confined = seen["confined"]
    assert confined["no_new_privs"] is True
    assert confined["seccomp"] is True
    assert seen["connect"][f"127.0.0.1:{listener}"].startswith("denied")
    assert seen["read"][str(staged)] == "allowed"
    if landlock_abi() < 1:
        pytest.skip("this kernel has no Landlock: the systemd unit's sandboxing applies instead")
    assert confined["landlock"] >= 1
    assert seen["read"][str(token)].startswith("denied")
    assert seen["read"][str(docs / "a.txt")].startswith("denied")


def test_the_parser_environment_is_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_SECRET_FOR_TEST", "must-not-leak")
    with ParserSandbox(timeout_s=20, memory_mb=1024, max_text_chars=100_000) as sandbox:
        sandbox.start()
        pid = sandbox.worker_pid
        assert pid is not None
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    names = {e.split(b"=", 1)[0].decode() for e in environ if e}
    assert "APPLIANCE_SECRET_FOR_TEST" not in names
    assert names <= {
        "PATH",
        "PYTHONPATH",
        "TMPDIR",
        "LANG",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
    }
    assert os.environ["APPLIANCE_SECRET_FOR_TEST"] == "must-not-leak"
