"""A real core service (real models, real store, real accounts) for the UI tests to talk to.

It runs in this process on a port-0 API over a tiny generated documents folder with two
collections (``legal/``, ``hr/``) and one shared file at the top, and is built once per session:
the chat and embedding models take seconds to load.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.api import ServiceClient
from appliance.core.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "ui" / "app.py"

ADMIN = ("ada", "ada-password-1")
STAFF = ("sam", "sam-password-1")

DOCUMENTS = {
    "legal/contract.md": (
        "# Supply contract\n\nThe supply contract with Acme Ltd runs for 36 months and renews "
        "automatically unless cancelled with 90 days notice.\n"
    ),
    "hr/leave.md": (
        "# Annual leave\n\nEvery employee receives 27 days of paid annual leave per year. Unused "
        "leave of up to 5 days carries over to the next year.\n"
    ),
    "handbook.md": (
        "# Office hours\n\nThe office opens at 8 am and closes at 6 pm on weekdays. Visitors "
        "sign in at the front desk.\n"
    ),
}


@dataclass
class Core:
    """The running core service and what the tests need to reach it."""

    service: Any  # appliance.service.CoreService
    settings: Settings
    docs: Path

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir

    def client(self) -> ServiceClient:
        client = ServiceClient.find(self.data_dir)
        assert client is not None, "the core service does not answer"
        return client

    def session(self, username: str, password: str) -> ServiceClient:
        client = self.client()
        reply = client.call("POST", "/auth/login", {"username": username, "password": password})
        return client.with_session(reply["session"])


def wait_indexed(client: ServiceClient, count: int, timeout: float = 120.0) -> dict[str, Any]:
    """Wait until ``count`` documents are indexed and nothing is in progress."""
    deadline = time.monotonic() + timeout
    while True:
        info = client.call("GET", "/admin/documents")
        if info["documents"] >= count and not info["in_progress"]:
            return dict(info)
        if time.monotonic() > deadline:
            raise AssertionError(f"documents were not indexed in {timeout:g} s: {info}")
        time.sleep(0.2)


def start_core(data: Path, docs: Path, role: str) -> Core:
    """Build the core service with the real wiring, start it and add the test accounts."""
    from appliance.wiring import open_core_service, prepare_process

    settings = load_settings(
        env={},
        overrides={
            "data_dir": str(data),
            "service": {"port": 0},
            "metrics": {"port": 0},
            "ingest": {"docs_dir": str(docs), "debounce_s": 0.2, "reconcile_interval_s": 0},
            "chat": {"n_threads": 2},
        },
    )
    prepare_process(settings)
    service = open_core_service(settings, docs, role=role)
    try:
        service.start()
        service.accounts.add_user(*ADMIN, role="admin", groups=["legal", "hr"])
        service.accounts.add_user(*STAFF, role="staff", groups=["hr"])
        service.accounts.grant("legal", ["legal"])
        service.accounts.grant("hr", ["hr"])
    except BaseException:
        service.close()
        raise
    return Core(service, settings, docs)


def stop_core(core: Core) -> None:
    core.service.close()


@pytest.fixture(scope="session")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Core]:
    root = tmp_path_factory.mktemp("ui-core")
    docs = root / "docs"
    for rel, text in DOCUMENTS.items():
        (docs / rel).parent.mkdir(parents=True, exist_ok=True)
        (docs / rel).write_text(text, encoding="utf-8")
    running = start_core(root / "data", docs, role="ui-tests")
    try:
        wait_indexed(running.client(), len(DOCUMENTS))
        yield running
    finally:
        stop_core(running)


@pytest.fixture
def ui_env(core: Core, monkeypatch: pytest.MonkeyPatch) -> Core:
    """Point the UI (``APPLIANCE_DATA_DIR``) at the running core service."""
    monkeypatch.setenv("APPLIANCE_DATA_DIR", str(core.data_dir))
    return core


@pytest.fixture
def app(ui_env: Core) -> Callable[..., Any]:
    """A fresh ``AppTest`` of ``ui/app.py``, already run once (the sign-in form)."""
    from streamlit.testing.v1 import AppTest

    def make(timeout: float = 60.0) -> AppTest:
        at = AppTest.from_file(str(APP), default_timeout=timeout)
        return at.run()

    return make
