"""The core service's local API: JSON over HTTP on loopback, with a bearer token.

The token lives in ``DATA/service.token`` (mode 0600), so only the account that runs the service
(and root) can call it; ``DATA/service.json`` says where it listens. Clients use ``ServiceClient``.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError, ServiceError

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


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 reset connections when 20 UI sessions signed in at once while
    # the model held the CPU (benchmarks/load_test.py).
    request_queue_size = 128


class ApiServer:
    """A threaded HTTP server whose routes are ``(method, path) -> handler(body) -> JSON``."""

    def __init__(
        self, data_dir: Path, host: str, port: int, routes: dict[tuple[str, str], Handler]
    ):
        self.data_dir = data_dir
        self.routes = {("GET", "/health"): lambda _req: {"ok": True}, **routes}
        self.token = secrets.token_urlsafe(32)
        server = self

        class _Request(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("api: " + fmt, *args)

            def _reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _raw(self, raw: Raw) -> None:
                self.send_response(200)
                self.send_header("Content-Type", raw.content_type)
                self.send_header("Content-Length", str(len(raw.data)))
                self.send_header("X-Filename", raw.filename.encode("utf-8").hex())
                self.end_headers()
                self.wfile.write(raw.data)

            def _stream(self, first: Any, events: Iterator[Any]) -> None:
                """NDJSON in HTTP/1.1 chunks: one JSON document per line, flushed as produced."""
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    line = json.dumps(first).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
                    for event in events:
                        line = json.dumps(event).encode() + b"\n"
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                        self.wfile.flush()
                except (ApplianceError, ValueError) as exc:
                    line = json.dumps({"type": "error", "error": str(exc)}).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                except (BrokenPipeError, ConnectionResetError):
                    log.info("api stream: the client went away")
                    return
                except Exception as exc:
                    log.exception("api stream failed")
                    line = json.dumps({"type": "error", "error": type(exc).__name__}).encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line) + 1, line + b"\n"))
                finally:
                    # Close the producer now, not whenever it is collected: an aborted answer
                    # is audited as such at once (and frees the model).
                    close = getattr(events, "close", None)
                    if close is not None:
                        close()
                self.wfile.write(b"0\r\n\r\n")

            def _handle(self, method: str) -> None:
                path = self.path.split("?", 1)[0]
                if path != "/health" and not secrets.compare_digest(
                    self.headers.get("Authorization", ""), f"Bearer {server.token}"
                ):
                    self._reply(401, {"error": "missing or wrong token"})
                    return
                handler = server.routes.get((method, path))
                if handler is None:
                    self._reply(404, {"error": f"no route {method} {path}"})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    self._reply(413, {"error": "request too large"})
                    return
                try:
                    body = json.loads(self.rfile.read(length) or b"{}") if length else {}
                    if not isinstance(body, dict):
                        raise ValueError("the request body must be a JSON object")
                    request = Request(
                        body=body,
                        session=self.headers.get(SESSION_HEADER) or None,
                        client=str(self.client_address[0]),
                    )
                    result = handler(request)
                    if isinstance(result, Raw):
                        self._raw(result)
                    elif isinstance(result, Iterator):
                        # the first event is computed before the status is sent, so that a
                        # refusal (no session, no access) is still an HTTP error
                        first = next(result, None)
                        if first is None:
                            self._reply(200, {})
                        else:
                            self._stream(first, result)
                    else:
                        self._reply(200, result)
                except (ApplianceError, ValueError, KeyError, TypeError) as exc:
                    status = int(getattr(exc, "http_status", 400))
                    self._reply(status, {"error": str(exc), "type": type(exc).__name__})
                except Exception as exc:
                    log.exception("api handler %s %s failed", method, path)
                    self._reply(500, {"error": f"internal error: {type(exc).__name__}"})

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

        try:
            self._httpd = _Server((host, port), _Request)
        except OSError as exc:
            raise ServiceError(
                f"the core service cannot listen on {host}:{port}: {exc.strerror}; "
                "set service.port (APPLIANCE_SERVICE__PORT) to a free port"
            ) from exc
        self._httpd.daemon_threads = True
        self.host, self.port = self._httpd.server_address[:2]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="api", daemon=True)

    def start(self) -> None:
        token_path = self.data_dir / TOKEN_FILE
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.token)
        info = {"pid": os.getpid(), "host": self.host, "port": self.port}
        tmp = self.data_dir / (SERVICE_FILE + ".tmp")
        tmp.write_text(json.dumps(info), encoding="utf-8")
        os.replace(tmp, self.data_dir / SERVICE_FILE)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and remove the service files; safe to call twice or before start."""
        if not self._thread.is_alive():
            self._httpd.server_close()
            return
        for name in (SERVICE_FILE, TOKEN_FILE):
            try:
                info = (self.data_dir / name).read_text(encoding="utf-8")
                if name == TOKEN_FILE or json.loads(info).get("pid") == os.getpid():
                    (self.data_dir / name).unlink()
            except (OSError, ValueError):
                pass
        self._httpd.shutdown()
        self._httpd.server_close()


class ServiceClient:
    """Calls a running core service of a data folder."""

    def __init__(
        self, host: str, port: int, token: str, timeout: float = 600.0, session: str | None = None
    ) -> None:
        self.host, self.port, self.token, self.timeout = host, port, token, timeout
        self.session = session

    def _headers(self) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        if self.session:
            headers[SESSION_HEADER] = self.session
        return headers

    def with_session(self, session: str | None) -> ServiceClient:
        """The same service, acting for the signed-in user of ``session``."""
        return ServiceClient(self.host, self.port, self.token, self.timeout, session)

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
        client = cls(str(info["host"]), int(info["port"]), token)
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
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout)
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
            message = payload.get("error") if isinstance(payload, dict) else payload
            raise ServiceError(
                f"the core service refused {method} {path}: {message}", status=response.status
            )
        return payload

    def download(self, path: str, body: dict[str, Any]) -> tuple[str, str, bytes]:
        """POST and return a binary reply as (file name, content type, bytes)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
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
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            headers = self._headers()
            conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
            response = conn.getresponse()
            if response.status != 200:
                payload = json.loads(response.read() or b"null")
                message = payload.get("error") if isinstance(payload, dict) else payload
                raise ServiceError(
                    f"the core service refused POST {path}: {message}", status=response.status
                )
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
