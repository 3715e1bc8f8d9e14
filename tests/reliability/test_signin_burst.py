"""Fifty staff sign in at the same moment against the real core service (its API on uvicorn,
real Argon2id hashing, at most two checks at once): every sign-in succeeds, none is reset,
refused or throttled; slow is fine. Once with no forwarded address (local tools), once with
one shared address (the UI behind one proxy or office NAT forwards the same address for all),
where throttling by address must not count the burst's own attempts as failures."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.core.settings import load_settings

USERS = 50
PASSWORD = "burst-password-{n:02d}"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from appliance.wiring import open_core_service, prepare_process

    root = tmp_path_factory.mktemp("burst")
    docs = root / "docs"
    docs.mkdir()
    settings = load_settings(
        env={},
        overrides={
            "data_dir": str(root / "data"),
            "service": {"port": 0},
            "metrics": {"port": 0},
            "ingest": {"docs_dir": str(docs), "reconcile_interval_s": 0},
        },
    )
    prepare_process(settings)
    core = open_core_service(settings, docs, role="burst-tests", answering=False)
    try:
        core.start()
        for n in range(USERS):
            core.accounts.add_user(f"staff{n:02d}", PASSWORD.format(n=n), role="staff")
        yield core
    finally:
        core.stop()
        core.ingestion.close()


def burst(core: Any, client: str, data: Path) -> list[tuple[int, str]]:
    """Every user signs in at once, each on its own connection; (HTTP status, error) each."""
    token = (data / "service.token").read_text(encoding="utf-8").strip()
    port = core.api.port
    ready = threading.Barrier(USERS)
    results: list[tuple[int, str]] = [(0, "not run")] * USERS

    def sign_in(n: int) -> None:
        body = {"username": f"staff{n:02d}", "password": PASSWORD.format(n=n)}
        if client:
            body["client"] = client
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        try:
            conn.connect()  # all connections open first, then all requests go at once
            ready.wait(timeout=60)
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            conn.request("POST", "/auth/login", json.dumps(body), headers)
            response = conn.getresponse()
            payload = json.loads(response.read())
            results[n] = (response.status, "" if response.status == 200 else str(payload))
        except Exception as exc:  # a reset or a timeout: what this test is about
            results[n] = (0, f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()

    threads = [threading.Thread(target=sign_in, args=(n,)) for n in range(USERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return results


@pytest.mark.parametrize("client", ["", "10.0.0.9"], ids=["local-tools", "one-shared-address"])
def test_fifty_simultaneous_sign_ins_all_succeed(service: Any, client: str) -> None:
    results = burst(service, client, service.settings.data_dir)
    failed = [(n, r) for n, r in enumerate(results) if r[0] != 200]
    assert not failed, f"{len(failed)} of {USERS} sign-ins failed: {failed[:5]}"
