"""Keep every appliance process off the network.

``enforce_offline()`` sets the offline switches of the libraries we use (Hugging Face hub,
transformers, datasets, telemetry) and installs a guard on ``socket.connect`` that refuses any
connection to an address that is neither loopback nor a Unix socket nor in the allow-list
(a configured Qdrant or Ollama host). Refusals are logged and raise ``OfflineViolation``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

_allowed_hosts: set[str] = set()
_original_connect = socket.socket.connect
_original_connect_ex = socket.socket.connect_ex


class OfflineViolation(ConnectionRefusedError):
    """A connection to a non-loopback address that is not allowed."""


def _is_allowed(address: Any, family: int) -> bool:
    if family == getattr(socket, "AF_UNIX", object()):
        return True
    if not isinstance(address, tuple) or not address:
        return True
    host = str(address[0])
    if host in _allowed_hosts or host in {"localhost", ""}:
        return True
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host in _allowed_hosts
    return ip.is_loopback or str(ip) in _allowed_hosts


def _guarded_connect(self: socket.socket, address: Any) -> None:
    if not _is_allowed(address, self.family):
        log.error("refused a network connection to %r: the appliance is offline", address)
        raise OfflineViolation(f"the appliance is offline: connection to {address!r} refused")
    _original_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: Any) -> int:
    if not _is_allowed(address, self.family):
        log.error("refused a network connection to %r: the appliance is offline", address)
        raise OfflineViolation(f"the appliance is offline: connection to {address!r} refused")
    return _original_connect_ex(self, address)


def allowed_hosts_from_urls(urls: Iterable[str | None]) -> set[str]:
    """Hosts named by configured server URLs (Qdrant, Ollama), resolved to their addresses too."""
    from urllib.parse import urlsplit

    hosts: set[str] = set()
    for url in urls:
        if not url:
            continue
        host = urlsplit(url).hostname
        if not host:
            continue
        hosts.add(host)
        with contextlib.suppress(OSError):
            hosts.update(str(info[4][0]) for info in socket.getaddrinfo(host, None))
    return hosts


def enforce_offline(allowed_hosts: Iterable[str] = ()) -> None:
    """Set the libraries' offline switches and guard outgoing connections. Idempotent."""
    for key, value in OFFLINE_ENV.items():
        os.environ[key] = value
    _allowed_hosts.clear()
    _allowed_hosts.update(allowed_hosts)
    socket.socket.connect = _guarded_connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign,assignment]
