"""The core service as the UI uses it: sign-in, roles decided server side, collections as access
boundaries inside the vector-store query, the audit log and /metrics. Real models, real store."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.api import ServiceClient
from appliance.core.audit import read, verify
from appliance.core.errors import ServiceError
from appliance.core.settings import load_settings

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator:  # type: ignore[type-arg]
    from appliance.wiring import open_core_service, prepare_process

    root = tmp_path_factory.mktemp("svc")
    docs = root / "docs"
    (docs / "legal").mkdir(parents=True)
    (docs / "hr").mkdir()
    (docs / "legal" / "settlement.md").write_text(
        "# Settlement\n\nThe Hartwell settlement was agreed at 4.2 million euros in March.\n"
    )
    (docs / "hr" / "salaries.md").write_text(
        "# Salaries\n\nThe Hartwell team lead earns 98,000 euros per year.\n"
    )
    (docs / "welcome.md").write_text("# Welcome\n\nThe office opens at 8 in the morning.\n")
    settings = load_settings(
        env={},
        overrides={
            "data_dir": str(root / "data"),
            "service": {"port": 0},
            "metrics": {"port": 0},
            "ingest": {"docs_dir": str(docs), "debounce_s": 0.2, "reconcile_interval_s": 0},
        },
    )
    prepare_process(settings)
    svc = open_core_service(settings, docs, role="tests")
    svc.start()
    svc.accounts.add_user("lawyer", PASSWORD, role="staff", groups=["legal-team"])
    svc.accounts.add_user("clerk", PASSWORD, role="staff", groups=["hr-team"])
    svc.accounts.add_user("boss", PASSWORD, role="admin", groups=["legal-team"])
    svc.accounts.grant("legal-team", ["legal"])
    svc.accounts.grant("hr-team", ["hr"])
    yield svc
    svc.close()


def client_for(service, username: str | None = None) -> ServiceClient:  # type: ignore[no-untyped-def]
    client = ServiceClient.find(service.settings.data_dir)
    assert client is not None
    if username is None:
        return client
    session = client.call("POST", "/auth/login", {"username": username, "password": PASSWORD})
    return client.with_session(session["session"])


def test_wrong_password_and_no_session_are_refused(service) -> None:  # type: ignore[no-untyped-def]
    client = client_for(service)
    with pytest.raises(ServiceError) as wrong:
        client.call("POST", "/auth/login", {"username": "lawyer", "password": "nope nope nope"})
    assert wrong.value.status == 401
    assert "invalid username or password" in str(wrong.value)
    with pytest.raises(ServiceError) as expired:
        client.with_session("not-a-session").call("POST", "/search", {"query": "x"})
    assert expired.value.status == 401


def test_staff_cannot_reach_admin_actions(service) -> None:  # type: ignore[no-untyped-def]
    staff = client_for(service, "lawyer")
    for method, path, body in (
        ("GET", "/admin/users", None),
        ("POST", "/admin/users/create", {"username": "x", "password": PASSWORD}),
        ("POST", "/admin/upload", {"name": "a.md", "content_b64": ""}),
        ("POST", "/admin/grants", {"group": "legal-team", "grant": ["hr"]}),
        ("GET", "/admin/documents", None),
        ("POST", "/reconcile", {}),
        ("GET", "/status", None),
    ):
        with pytest.raises(ServiceError) as denied:
            staff.call(method, path, body)
        assert denied.value.status == 403, path
    admin = client_for(service, "boss")
    assert {u["username"] for u in admin.call("GET", "/admin/users")} >= {"lawyer", "clerk"}


def test_collections_bound_search_answers_and_downloads(service) -> None:  # type: ignore[no-untyped-def]
    lawyer, clerk = client_for(service, "lawyer"), client_for(service, "clerk")
    query = {"query": "Hartwell euros", "k": 10}
    lawyer_paths = {r["path"] for r in lawyer.call("POST", "/search", query)}
    clerk_paths = {r["path"] for r in clerk.call("POST", "/search", query)}
    assert "legal/settlement.md" in lawyer_paths
    assert not any(p.startswith("hr/") for p in lawyer_paths)
    assert "hr/salaries.md" in clerk_paths
    assert not any(p.startswith("legal/") for p in clerk_paths)

    answer = clerk.call("POST", "/ask", {"question": "What was the Hartwell settlement amount?"})
    cited = {s["path"] for s in answer["answer"]["sources"]}
    retrieved = {r["path"] for r in answer["answer"]["retrieved"]}
    assert not any(p.startswith("legal/") for p in cited | retrieved)
    assert "4.2" not in answer["answer"]["answer"]

    name, _type, data = lawyer.download("/documents/file", {"path": "legal/settlement.md"})
    assert name == "settlement.md"
    assert b"4.2 million" in data
    for path in (
        "hr/salaries.md",
        "../data/accounts.sqlite3",
        "/etc/passwd",
        "legal/../hr/salaries.md",
    ):
        with pytest.raises(ServiceError) as denied:
            lawyer.download("/documents/file", {"path": path})
        assert denied.value.status == 403, path


def test_audit_log_records_questions_with_retrieved_documents(service) -> None:  # type: ignore[no-untyped-def]
    lawyer = client_for(service, "lawyer")
    answer = lawyer.call("POST", "/ask", {"question": "What was the Hartwell settlement amount?"})
    records = list(read(service.settings.audit_path, user="lawyer", event="question"))
    assert records
    last = records[-1]["data"]
    assert last["question"] == "What was the Hartwell settlement amount?"
    assert last["model"] == answer["answer"]["model"]
    assert {r["path"] for r in last["retrieved"]} >= {"legal/settlement.md"}
    assert all(r["doc_hash"] and r["chunk_id"] for r in last["retrieved"])
    assert any(r["event"] == "login" for r in read(service.settings.audit_path, user="lawyer"))
    assert verify(service.settings.audit_path).ok


def scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + (json.dumps(sample.labels, sort_keys=True) if sample.labels else "")
            values[key] = sample.value
    return values


def test_metrics_parse_and_move_when_a_question_is_asked(service) -> None:  # type: ignore[no-untyped-def]
    port = service.metrics_server.port
    before = scrape(port)
    lawyer = client_for(service, "lawyer")
    lawyer.call("POST", "/ask", {"question": "When does the office open?"})
    after = scrape(port)
    assert after["appliance_questions_total"] == before["appliance_questions_total"] + 1
    assert after["appliance_retrieval_seconds_count"] > before["appliance_retrieval_seconds_count"]
    assert after["appliance_documents_indexed"] == 3
    assert after['appliance_logins_total{"result": "success"}'] >= 1
    assert any(k.startswith("appliance_active_model_info") for k in after)


def test_feedback_is_stored_with_the_answer(service) -> None:  # type: ignore[no-untyped-def]
    lawyer = client_for(service, "lawyer")
    final = lawyer.call("POST", "/ask", {"question": "When does the office open?"})
    lawyer.call(
        "POST", "/feedback", {"message": final["message"], "rating": "up", "comment": "clear"}
    )
    stored = [f for f in service.conversations.feedback() if f["message"] == final["message"]]
    assert stored[0]["rating"] == "up"
    assert stored[0]["question"] == "When does the office open?"
    assert stored[0]["model"] == final["answer"]["model"]
    other = client_for(service, "clerk")
    with pytest.raises(ServiceError):
        other.call("POST", "/feedback", {"message": final["message"], "rating": "down"})


def test_models_are_listed_activated_and_rolled_back_through_the_service(  # type: ignore[no-untyped-def]
    service, tmp_path: Path
) -> None:
    import shutil

    from appliance.core.chat_settings import default_chat_model_path
    from finetune.registry import ModelRegistry

    admin = client_for(service, "boss")
    listed = admin.call("GET", "/admin/models")
    assert [(v["version"], v["active"]) for v in listed["versions"]] == [("base", True)]
    copy = service.settings.models_dir / "v1-test.gguf"
    shutil.copyfile(default_chat_model_path(), copy)
    with copy.open("ab") as f:
        f.write(b"\0" * 16)  # another file, another hash, same weights
    registry = ModelRegistry(service.settings.models_dir)
    version = registry.register({"gguf": {"path": str(copy)}, "gate": {"passed": True}})
    reply = admin.call("POST", "/admin/models/activate", {"version": version})
    assert reply == {"active": version, "switch_error": None}
    assert service.answerer.chat.version == version
    assert admin.call("GET", "/admin/models")["active"]["version"] == version
    assert admin.call("POST", "/admin/models/activate", {"rollback": True})["active"] == "base"
    assert service.answerer.chat.version == "base"


def test_fine_tuning_runs_are_queued_listed_and_stopped_through_the_service(  # type: ignore[no-untyped-def]
    service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance import model_routes
    from finetune.dataset import build_dataset

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Which form is number {i} of {i * 13}?"},
                        {"role": "assistant", "content": f"Form {i}."},
                    ]
                }
            )
            + "\n"
            for i in range(4)
        )
    )
    build_dataset(service.settings, [str(pairs)], "svc-pairs")
    launched: list[str] = []  # the seam: a real launch would start a training process
    monkeypatch.setattr(
        model_routes, "launch_run", lambda _svc, run: launched.append(run) or "test"
    )
    admin = client_for(service, "boss")
    listing = admin.call("GET", "/admin/finetune/runs")
    assert "svc-pairs" in [d["name"] for d in listing["datasets"]]
    started = admin.call("POST", "/admin/finetune/start", {"dataset": "svc-pairs", "max_steps": 2})
    assert launched == [started["run"]]
    runs = admin.call("GET", "/admin/finetune/runs")["runs"]
    assert runs[0]["run"] == started["run"]
    assert runs[0]["status"] == "queued"
    assert runs[0]["requested_by"] == "boss"
    admin.call("POST", "/admin/finetune/stop", {"run": started["run"]})
    assert (service.settings.runs_dir / started["run"] / "stop").exists()
    with pytest.raises(ServiceError, match="no loss file yet"):
        admin.download("/admin/finetune/file", {"run": started["run"], "kind": "loss"})
    with pytest.raises(ServiceError, match="inside the data folder"):
        admin.call("POST", "/admin/finetune/evaluate", {"gguf": "/etc/passwd", "items": []})


# --- issue 13: complete audit, sign-in records, first sign-in ----------------------------------


def test_aborted_streams_are_audited_before_any_text(service) -> None:  # type: ignore[no-untyped-def]
    """A client that reads the first event and goes away has been shown the evidence: the
    question is already in the log, and the end says 'aborted'."""
    path = service.settings.audit_path
    before = len(list(read(path, user="lawyer", event="question")))
    lawyer = client_for(service, "lawyer")
    for _ in range(3):
        conn = http.client.HTTPConnection(lawyer.host, lawyer.port, timeout=60)
        body = {"question": "What was the Hartwell settlement amount?", "stream": True}
        conn.request("POST", "/ask", body=json.dumps(body), headers=lawyer._headers())
        response = conn.getresponse()
        first = json.loads(response.readline())
        assert first["type"] == "sources"
        conn.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ends = list(read(path, user="lawyer", event="answer_end"))
        if sum(r["data"]["status"] == "aborted" for r in ends) >= 3:
            break
        time.sleep(0.2)
    questions = list(read(path, user="lawyer", event="question"))
    assert len(questions) == before + 3
    assert all(q["data"]["retrieved"] for q in questions[-3:])
    assert sum(r["data"]["status"] == "aborted" for r in ends) >= 3
    assert verify(path).ok


def test_failed_sign_ins_keep_raw_names_out_of_user_and_are_rate_limited(service) -> None:  # type: ignore[no-untyped-def]
    path = service.settings.audit_path
    client = client_for(service)
    hostile = "eve\n2026-01-01T00:00:00Z  admin  login\x1b[2K"
    for n in range(8):
        with pytest.raises(ServiceError):
            client.call(
                "POST",
                "/auth/login",
                {"username": hostile, "password": f"guess {n}", "client": "198.51.100.4"},
            )
    records = [
        r for r in read(path, event="login_failed") if r["data"].get("client") == "198.51.100.4"
    ]
    assert 1 <= len(records) <= 3  # rate-limited per name and address
    assert all(r["user"] is None and r["data"]["attempt"] == hostile for r in records)
    assert verify(path).ok


def test_a_first_sign_in_can_only_change_its_password(service) -> None:  # type: ignore[no-untyped-def]
    from appliance.first_admin import INITIAL_PASSWORD_FILE

    service.accounts.add_user("admin", "first password 1", role="admin", must_change=True)
    initial = service.settings.data_dir / INITIAL_PASSWORD_FILE
    initial.write_text("first password 1\n")
    client = client_for(service)
    session = client.call(
        "POST", "/auth/login", {"username": "admin", "password": "first password 1"}
    )
    assert session["must_change_password"] is True
    newbie = client.with_session(session["session"])
    with pytest.raises(ServiceError) as refused:
        newbie.call("POST", "/search", {"query": "office"})
    assert refused.value.status == 403
    assert newbie.call("GET", "/auth/me")["must_change_password"] is True
    reply = newbie.call(
        "POST", "/auth/password", {"old": "first password 1", "new": "my own passphrase"}
    )
    assert reply["must_change_password"] is False
    assert not initial.exists()  # the shown-once password has served its purpose
    assert newbie.call("POST", "/search", {"query": "office"}) is not None


def test_history_hides_sources_after_revocation_or_deletion(service) -> None:  # type: ignore[no-untyped-def]
    docs = service.ingestion.docs_dir
    memo = docs / "legal" / "memo.md"
    memo.write_text("# Memo\n\nThe Quillfeather arbitration hearing is set for 14 May.\n")
    deadline = time.monotonic() + 60
    lawyer = client_for(service, "lawyer")
    while time.monotonic() < deadline:
        hits = lawyer.call("POST", "/search", {"query": "Quillfeather arbitration hearing"})
        if any(h["path"] == "legal/memo.md" for h in hits):
            break
        time.sleep(0.3)
    final = lawyer.call(
        "POST", "/ask", {"question": "When is the Quillfeather arbitration hearing?"}
    )
    conversation = final["conversation"]

    def sources() -> list[dict]:  # type: ignore[type-arg]
        messages = lawyer.call("POST", "/conversations/get", {"conversation": conversation})
        return messages[-1]["sources"]

    assert any(s["path"] == "legal/memo.md" and "Quillfeather" in s["text"] for s in sources())
    service.accounts.revoke("legal-team", ["legal"])
    try:
        shown = sources()
        assert all(s.get("unavailable") for s in shown if s["path"] != "welcome.md")
        assert not any("Quillfeather" in s["text"] or "legal/" in s["path"] for s in shown)
    finally:
        service.accounts.grant("legal-team", ["legal"])
    memo.unlink()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(s["path"] == "legal/memo.md" for s in sources()):
        time.sleep(0.3)
    assert not any("Quillfeather" in s["text"] for s in sources())


def test_an_overlong_question_is_refused_clearly(service) -> None:  # type: ignore[no-untyped-def]
    lawyer = client_for(service, "lawyer")
    with pytest.raises(ServiceError) as refused:
        lawyer.call("POST", "/ask", {"question": "why? " * 1000})
    assert refused.value.status == 400
    assert "limit is 4000" in str(refused.value)


def test_admin_chunk_reads_obey_grants_and_are_audited(service) -> None:  # type: ignore[no-untyped-def]
    boss = client_for(service, "boss")  # an admin granted legal only
    rows = boss.call("POST", "/admin/chunks", {"limit": 50, "seed": 1})
    files = {r["file"] for r in rows}
    assert files
    assert not any(f.startswith("hr/") for f in files)
    reads = [
        r
        for r in read(service.settings.audit_path, user="boss", event="admin")
        if r["data"].get("action") == "chunks_read"
    ]
    assert reads
    assert set(reads[-1]["data"]["files"]) == files
    everything = client_for(service).call("POST", "/admin/chunks", {"limit": 50, "seed": 1})
    assert any(r["file"].startswith("hr/") for r in everything)  # the host's operator sees all
