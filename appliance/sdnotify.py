"""The systemd notification protocol (sd_notify(3)) without libsystemd.

``appliance-core.service`` is ``Type=notify`` with ``WatchdogSec=``: systemd considers it started
when it sends ``READY=1`` and restarts it when the ``WATCHDOG=1`` pings stop. ``ServiceNotifier``
does both from one thread: it waits until ``healthy()`` first answers true (the local API is
serving), says ``READY=1``, then pings at half the watchdog interval for as long as ``healthy()``
keeps answering true. A hung service therefore stops pinging and is restarted, while a busy one
(a long scan runs beside the API) keeps its pings. Outside systemd (no ``NOTIFY_SOCKET``) every
call is a no-op, so the same code path runs in a terminal and in tests.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (``"READY=1"``, ``"STATUS=..."``...) to systemd; False when not under a
    ``Type=notify`` unit or when the datagram could not be sent (never raises: a lost
    notification must not take the service down)."""
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    # A leading "@" names a socket in the abstract namespace (a NUL byte for the kernel).
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode("utf-8"), target)
    except OSError as exc:
        log.warning("could not notify systemd (%s): %s", message.split("=", 1)[0], exc)
        return False
    return True


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None when the watchdog is
    off or meant for another process (``WATCHDOG_PID`` names the main process only)."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    if usec <= 0:
        return None
    wanted_pid = env.get("WATCHDOG_PID")
    if wanted_pid and wanted_pid != str(os.getpid() if pid is None else pid):
        return None
    return usec / 2 / 1_000_000


class ServiceNotifier:
    """READY=1 once healthy, WATCHDOG=1 while healthy, STOPPING=1 at the end; a context manager.

    ``healthy`` is called from the notifier's thread and must return quickly (it is given the
    ping interval as its deadline); ``status`` gives the ``STATUS=`` line shown by
    ``systemctl status`` once ready.
    """

    def __init__(
        self,
        healthy: Callable[[], bool],
        *,
        status: Callable[[], str] | None = None,
        env: Mapping[str, str] | None = None,
        poll_s: float = 0.5,
    ) -> None:
        self._env = dict(os.environ if env is None else env)
        self._healthy = healthy
        self._status = status
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()
        self.pings = 0

    @property
    def active(self) -> bool:
        """Whether systemd listens (the unit is Type=notify)."""
        return bool(self._env.get("NOTIFY_SOCKET"))

    def _send(self, message: str) -> None:
        notify(message, self._env)

    def _is_healthy(self) -> bool:
        try:
            return bool(self._healthy())
        except Exception:  # a failing probe means unhealthy, never a dead notifier thread
            log.debug("health probe failed", exc_info=True)
            return False

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._is_healthy():
                break
            self._stop.wait(self._poll_s)
        else:
            return
        self.ready.set()
        self._send("READY=1\nSTATUS=" + (self._status() if self._status else "ready"))
        interval = watchdog_interval(self._env)
        if interval is None:
            return
        unhealthy_reported = False
        while not self._stop.wait(interval):
            if self._is_healthy():
                self._send("WATCHDOG=1")
                self.pings += 1
                unhealthy_reported = False
            elif not unhealthy_reported:
                # No ping: systemd restarts the service once WatchdogSec passes without one.
                log.error("the core service's API stopped answering; watchdog pings withheld")
                self._send("STATUS=unhealthy: the local API does not answer")
                unhealthy_reported = True

    def start(self) -> ServiceNotifier:
        if self.active and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sd-notify", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Say STOPPING=1 and end the thread (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self.active:
            self._send("STOPPING=1\nSTATUS=stopping")
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> ServiceNotifier:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
