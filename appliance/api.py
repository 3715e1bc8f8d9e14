"""The core service's local API: JSON over HTTP on loopback (or a Unix socket), with a bearer
token, served by Starlette on uvicorn.

The token lives in ``DATA/service.token`` (mode 0600), so only the account that runs the service
(and root) can call it; ``DATA/service.json`` says where it listens. Clients use ``ServiceClient``.
"""

from __future__ import annotations

import contextlib
import hmac
import http.client
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.core.errors import ApplianceError, ServiceError

log = logging.getLogger(__name__)

SERVICE_FILE = "service.json"
TOKEN_FILE = "service.token"
MAX_BODY = 320 * 1024 * 1024  # an uploaded document, base64-encoded
SESSION_HEADER = "X-Appliance-Session"


@dataclass(frozen=True)
class Request:
    """What a route handler gets: the JSON body, the signed-in user's session token (the UI
    sends it; local tools do not) and the client's address."""

    body: dict[str, Any]
    session: str | None = None
    client: str = ""


@dataclass(frozen=True)
class Raw:
    """A route's binary reply (a document download)."""

    data: bytes
    content_type: str
    filename: str


Handler = Callable[[Request], Any]


class ApiServer:
    """The local API: a Starlette app on uvicorn, in a thread of the core service.

    Routes are ``(method, path) -> handler(Request)``; a handler returns JSON-ready data, a
    :class:`Raw` file, or an iterator of events that is streamed as NDJSON (HTTP/1.1 chunks).
    Handlers are blocking code: they run in worker threads (at most ``workers`` at once).

    What a hostile client meets, before any handler: ``GET /health`` reads no body; every other
    request needs the service token (compared as bytes, so any header value is just "wrong"),
    checked *before* the body is read; a declared or streamed body over ``max_body`` bytes is
    refused with 413 as soon as it is seen, never buffered. uvicorn keeps idle connections on
    the event loop (no thread each), closes idle keep-alive ones after ``keepalive_s`` and
    answers 503 beyond ``max_connections``.
    """

    def __init__(
        self,
        data_dir: Path,
        host: str,
        port: int,
        routes: dict[tuple[str, str], Handler],
        *,
        unix_socket: Path | None = None,
        max_body: int = MAX_BODY,
        max_connections: int = 2048,
        keepalive_s: float = 5.0,
        workers: int = 64,
    ):
        self.data_dir = data_dir
        self.routes = {("GET", "/health"): lambda _req: {"ok": True}, **routes}
        self.token = secrets.token_urlsafe(32)
        self.max_body = max_body
        self._expected = f"Bearer {self.token}".encode()
        self._workers = workers
        self._limiter: Any = None
        _raise_open_files_limit(max_connections + 256)
        try:
            self._sock = _listen(host, port, unix_socket)
        except OSError as exc:
            where = unix_socket or f"{host}:{port}"
            raise ServiceError(
                f"the core service cannot listen on {where}: {exc.strerror}; "
                "set service.port (APPLIANCE_SERVICE__PORT) to a free port"
            ) from exc
        self.unix_socket = unix_socket
        if unix_socket is None:
            self.host, self.port = self._sock.getsockname()[:2]
        else:
            self.host, self.port = host, 0
        import uvicorn

        config = uvicorn.Config(
            self._app(),
            lifespan="off",
            http="h11",
            loop="asyncio",
            access_log=False,
            log_level="warning",
            limit_concurrency=max_connections,
            timeout_keep_alive=max(1, int(keepalive_s)),
            timeout_graceful_shutdown=5,
            server_header=False,
            date_header=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="api", daemon=True
        )

    # --- the ASGI app ----------------------------------------------------------------------------

    def _app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.routing import Route

        return Starlette(routes=[Route("/{path:path}", self._endpoint, methods=["GET", "POST"])])

    def _token_ok(self, header: str | None) -> bool:
        # Starlette decodes headers as latin-1: any byte value compares, none raises.
        given = (header or "").encode("latin-1", "replace")
        return hmac.compare_digest(given, self._expected)

    async def _endpoint(self, http: Any) -> Any:
        import anyio
        from starlette.responses import JSONResponse, Response

        method, path = http.method, http.url.path
        if (method, path) == ("GET", "/health"):
            return JSONResponse({"ok": True})
        if not self._token_ok(http.headers.get("authorization")):
            return JSONResponse({"error": "missing or wrong token"}, status_code=401)
        handler = self.routes.get((method, path))
        if handler is None:
            return JSONResponse({"error": f"no route {method} {path}"}, status_code=404)
        try:
            raw = await self._body(http)
        except _TooLarge:
            return JSONResponse({"error": "request too large"}, status_code=413)
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._workers)
        try:
            body = json.loads(raw) if raw else {}
            if not isinstance(body, dict):
                raise ValueError("the request body must be a JSON object")
            request = Request(
                body=body,
                session=http.headers.get(SESSION_HEADER) or None,
                client=str(http.client.host) if http.client else "",
            )
            result = await anyio.to_thread.run_sync(handler, request, limiter=self._limiter)
            if isinstance(result, Raw):
                return Response(
                    result.data,
                    media_type=result.content_type,
                    headers={"X-Filename": result.filename.encode("utf-8").hex()},
                )
            if isinstance(result, Iterator):
                # the first event is computed before the status is sent, so that a refusal
                # (no session, no access) is still an HTTP error
                first = await anyio.to_thread.run_sync(_next_or_none, result, limiter=self._limiter)
                if first is None:
                    return JSONResponse({})
                return self._stream(first, result)
            return JSONResponse(result)
        except (ApplianceError, ValueError, KeyError, TypeError) as exc:
            status = int(getattr(exc, "http_status", 400))
            payload: dict[str, Any] = {"error": str(exc), "type": type(exc).__name__}
            headers = None
            retry = getattr(exc, "retry_after_s", None)
            if isinstance(retry, int | float) and status in (401, 429, 503):
                # a busy queue (503) or throttled sign-ins (401): when to try again
                payload["retry_after_s"] = math.ceil(retry)
                headers = {"Retry-After": str(max(1, math.ceil(retry)))}
            return JSONResponse(payload, status, headers=headers)
        except Exception as exc:
            log.exception("api handler %s %s failed", method, path)
            return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, 500)

    async def _body(self, http: Any) -> bytes:
        declared = http.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_body:
                    raise _TooLarge
            except ValueError:
                raise _TooLarge from None  # a length that is not a number: refuse, read nothing
        chunks, size = [], 0
        async for chunk in http.stream():
            size += len(chunk)
            if size > self.max_body:
                raise _TooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    def _stream(self, first: Any, events: Iterator[Any]) -> Any:
        import anyio
        from starlette.responses import StreamingResponse

        limiter = self._limiter

        async def lines() -> Any:
            try:
                yield json.dumps(first).encode() + b"\n"
                while True:
                    event = await anyio.to_thread.run_sync(_next_or_none, events, limiter=limiter)
                    if event is None:
                        return
                    yield json.dumps(event).encode() + b"\n"
            except (ApplianceError, ValueError) as exc:
                yield json.dumps({"type": "error", "error": str(exc)}).encode() + b"\n"
            except Exception as exc:
                log.exception("api stream failed")
                yield json.dumps({"type": "error", "error": type(exc).__name__}).encode() + b"\n"
            finally:
                # Close the producer now, in a worker thread, also when the client went away
                # (the response is cancelled then): an aborted answer is audited as such at
                # once and gives the model back.
                close = getattr(events, "close", None)
                if close is not None:
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(close, limiter=limiter)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    # --- lifecycle -------------------------------------------------------------------------------

    def alive(self, timeout: float = 5.0) -> bool:
        """Whether the API answers ``/health`` now (the systemd watchdog's test)."""
        client = ServiceClient(
            self.host, self.port, "", timeout, unix_socket=str(self.unix_socket or "") or None
        )
        try:
            client.call("GET", "/health", timeout=timeout)
        except ServiceError:
            return False
        return True

    def start(self) -> None:
        token_path = self.data_dir / TOKEN_FILE
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.token)
        info: dict[str, Any] = {"pid": os.getpid(), "host": self.host, "port": self.port}
        if self.unix_socket is not None:
            info["unix_socket"] = str(self.unix_socket)
        tmp = self.data_dir / (SERVICE_FILE + ".tmp")
        tmp.write_text(json.dumps(info), encoding="utf-8")
        os.replace(tmp, self.data_dir / SERVICE_FILE)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                raise ServiceError("the core service's API did not start within 30 s")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop serving and remove the service files; safe to call twice or before start."""
        if not self._thread.is_alive():
            self._sock.close()
            return
        for name in (SERVICE_FILE, TOKEN_FILE):
            try:
                info = (self.data_dir / name).read_text(encoding="utf-8")
                if name == TOKEN_FILE or json.loads(info).get("pid") == os.getpid():
                    (self.data_dir / name).unlink()
            except (OSError, ValueError):
                pass
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()
        if self.unix_socket is not None:
            with contextlib.suppress(OSError):
                self.unix_socket.unlink()


class _TooLarge(Exception):
    pass


def _next_or_none(events: Iterator[Any]) -> Any:
    return next(events, None)


def _listen(host: str, port: int, unix_socket: Path | None) -> socket.socket:
    if unix_socket is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            unix_socket.unlink()
        old = os.umask(0o117)  # created 0660: the service and its group (the UI)
        try:
            sock.bind(str(unix_socket))
        finally:
            os.umask(old)
        os.chmod(unix_socket, 0o660)
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    # The default backlog of 5 reset connections when 20 UI sessions signed in at once while
    # the model held the CPU (benchmarks/load_test.py).
    sock.listen(1024)
    sock.set_inheritable(False)
    return sock


def _raise_open_files_limit(wanted: int) -> None:
    """Idle connections cost a file descriptor each: raise the soft limit towards the hard."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class ServiceClient:
    """Calls a running core service of a data folder."""

    def __init__(
        self,
        host: str,
        port: int,
        token: str,
        timeout: float = 600.0,
        session: str | None = None,
        *,
        unix_socket: str | None = None,
    ) -> None:
        self.host, self.port, self.token, self.timeout = host, port, token, timeout
        self.session = session
        self.unix_socket = unix_socket

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.unix_socket:
            return _UnixConnection(self.unix_socket, timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def _headers(self) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        if self.session:
            headers[SESSION_HEADER] = self.session
        return headers

    def with_session(self, session: str | None) -> ServiceClient:
        """The same service, acting for the signed-in user of ``session``."""
        return ServiceClient(
            self.host, self.port, self.token, self.timeout, session, unix_socket=self.unix_socket
        )

    @classmethod
    def find(cls, data_dir: Path) -> ServiceClient | None:
        """The client of the data folder's running service, or None when none answers."""
        try:
            info = json.loads((data_dir / SERVICE_FILE).read_text(encoding="utf-8"))
            token = (data_dir / TOKEN_FILE).read_text(encoding="utf-8").strip()
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        unix = info.get("unix_socket")
        client = cls(str(info["host"]), int(info["port"]), token, unix_socket=unix)
        try:
            client.call("GET", "/health", timeout=2.0)
        except ServiceError:
            return None
        return client

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        conn = self._connection(timeout or self.timeout)
        try:
            data = json.dumps(body or {}).encode() if method == "POST" else None
            headers = self._headers()
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            payload = json.loads(response.read() or b"null")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise ServiceError(
                f"the core service at {self.host}:{self.port} did not answer: {exc}"
            ) from exc
        finally:
            conn.close()
        if response.status != 200:
            raise _refusal(method, path, response, payload)
        return payload

    def download(self, path: str, body: dict[str, Any]) -> tuple[str, str, bytes]:
        """POST and return a binary reply as (file name, content type, bytes)."""
        conn = self._connection(self.timeout)
        try:
            conn.request("POST", path, body=json.dumps(body).encode(), headers=self._headers())
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ServiceError(
                f"the core service at {self.host}:{self.port} failed: {exc}"
            ) from exc
        finally:
            conn.close()
        if response.status != 200:
            try:
                message = json.loads(data).get("error")
            except ValueError:
                message = data[:200].decode(errors="replace")
            raise ServiceError(
                f"the core service refused POST {path}: {message}", status=response.status
            )
        name = bytes.fromhex(response.getheader("X-Filename", "")).decode("utf-8", "replace")
        return name, response.getheader("Content-Type", "application/octet-stream"), data

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST and yield the NDJSON events of a streamed reply as they arrive."""
        conn = self._connection(self.timeout)
        try:
            headers = self._headers()
            conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
            response = conn.getresponse()
            if response.status != 200:
                payload = json.loads(response.read() or b"null")
                raise _refusal("POST", path, response, payload)
            while line := response.readline():
                event = json.loads(line)
                if event.get("type") == "error":
                    raise ServiceError(f"the core service failed: {event.get('error')}")
                yield event
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise ServiceError(
                f"the core service at {self.host}:{self.port} failed: {exc}"
            ) from exc
        finally:
            conn.close()


def _refusal(
    method: str, path: str, response: http.client.HTTPResponse, payload: Any
) -> ServiceError:
    """The error for a non-200 reply, with its ``Retry-After`` when it has one."""
    message = payload.get("error") if isinstance(payload, dict) else payload
    retry: float | None = None
    with contextlib.suppress(TypeError, ValueError):
        retry = float(response.getheader("Retry-After") or "")
    return ServiceError(
        f"the core service refused {method} {path}: {message}",
        status=response.status,
        retry_after_s=retry,
    )


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over the service's Unix socket (``service.unix_socket``)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock
