"""The local API server itself (Starlette on uvicorn), against hostile clients: bodies that are
never read without the token, bodies over the limit, odd headers, many idle connections, the
Unix socket. A real server on loopback with small routes of its own."""

from __future__ import annotations

import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.api import ApiServer, Request, ServiceClient
from appliance.core.errors import ServiceError


def _routes() -> dict[tuple[str, str], Any]:
    def events(_req: Request) -> Iterator[dict[str, Any]]:
        for n in range(3):
            yield {"type": "token", "text": str(n)}

    return {
        ("POST", "/echo"): lambda req: {"body": req.body},
        ("POST", "/events"): events,
    }


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ApiServer]:
    api = ApiServer(tmp_path, "127.0.0.1", 0, _routes(), max_body=64 * 1024)
    api.start()
    yield api
    api.stop()


def raw(port: int, request: bytes, *, read: bool = True, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        if not read:
            return b""
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)


def test_health_reads_no_body_even_with_a_bogus_length(server: ApiServer) -> None:
    started = time.monotonic()
    reply = raw(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
    assert time.monotonic() - started < 1.0
    # h11 refuses the length itself (400) or /health answers (200): either way at once.
    assert reply[:12] in (b"HTTP/1.1 200", b"HTTP/1.1 400"), reply[:40]


def test_an_unauthenticated_huge_body_is_refused_before_it_is_read(server: ApiServer) -> None:
    """200 MB announced, 1 MB sent: the 401 comes back at once, the rest is never buffered."""
    head = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 209715200\r\n\r\n"
    )
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head + b"x" * (1024 * 1024))
        reply = sock.recv(4096)
    assert time.monotonic() - started < 1.0
    assert reply.startswith(b"HTTP/1.1 401")


def test_a_body_over_the_limit_is_413_with_the_token(server: ApiServer) -> None:
    client = ServiceClient("127.0.0.1", server.port, server.token, timeout=10)
    assert client.call("POST", "/echo", {"a": 1}) == {"body": {"a": 1}}
    with pytest.raises(ServiceError) as refused:
        client.call("POST", "/echo", {"a": "x" * 100_000})
    assert refused.value.status == 413
    # A chunked body (no Content-Length) over the limit is cut off just the same.
    head = (
        f"POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.token}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"x" * 32768
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4)) + b"0\r\n\r\n"
    assert raw(server.port, head + body).startswith(b"HTTP/1.1 413")


@pytest.mark.parametrize(
    "header", ["Bearer \xe9\xe8", "Bearer " + "\u00ff" * 43, "", "Basic abc", "Bearer"]
)
def test_any_authorization_header_is_just_wrong(server: ApiServer, header: str) -> None:
    request = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nAuthorization: "
        + header.encode("latin-1")
        + b"\r\n\r\n{}"
    )
    assert raw(server.port, request).startswith(b"HTTP/1.1 401")


def test_health_answers_fast_with_many_idle_connections(server: ApiServer) -> None:
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(300)]
    try:
        client = ServiceClient("127.0.0.1", server.port, server.token, timeout=5)
        started = time.monotonic()
        assert client.call("GET", "/health") == {"ok": True}
        assert time.monotonic() - started < 1.0
        assert client.call("POST", "/echo", {"x": 1}) == {"body": {"x": 1}}
    finally:
        for sock in idle:
            sock.close()


def test_streams_arrive_as_ndjson(server: ApiServer) -> None:
    client = ServiceClient("127.0.0.1", server.port, server.token, timeout=10)
    assert [e["text"] for e in client.stream("/events", {})] == ["0", "1", "2"]


def test_the_unix_socket_is_0660_and_found_by_clients(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    api = ApiServer(tmp_path, "127.0.0.1", 0, _routes(), unix_socket=path)
    api.start()
    try:
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert path.stat().st_mode & 0o777 == 0o660
        client = ServiceClient.find(tmp_path)
        assert client is not None
        assert client.call("POST", "/echo", {"via": "unix"}) == {"body": {"via": "unix"}}
        assert api.alive()
    finally:
        api.stop()
    assert not path.exists()
