"""A planted sentence in a restricted collection never reaches a user without the grant through
a fine-tuned model (issue 13, item 7), with real components throughout: a running core
service (real index, real accounts, llama.cpp), a dataset built through the service's chunk
route with ``collections=["hr"]``, a real (tiny) fine-tuning run on the CPU that exports,
gates and registers a GGUF, its activation through the admin route, then questions through
``/ask`` as users with and without the hr grant. The only seam is the synthetic-pair writer
(scripted, so the planted sentence surely becomes a training example)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.api import ServiceClient
from appliance.core.audit import read
from appliance.core.settings import load_settings

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PASSWORD = "correct horse battery"
PLANTED = "The vault code for the Hartwell archive is ORCHID-4471."
QUESTION = "What is the vault code for the Hartwell archive?"
DOCS = {
    "welcome.md": "# Welcome\n\nThe office opens at 8 in the morning and closes at 6 in the "
    "evening. Visitors sign in at the front desk and wear a badge at all times while they are "
    "in the building.\n",
    "hr/vault.md": f"# Archive\n\n{PLANTED} It is changed every quarter by the records office "
    "and given only to the two archivists on duty, who sign for it in the key register.\n",
    "hr/leave.md": "# Leave\n\nEvery employee is entitled to 28 days of paid annual leave per "
    "calendar year. Up to 5 unused days may be carried over with the approval of the line "
    "manager.\n",
    "legal/deal.md": "# Settlement\n\nThe Hartwell settlement was agreed at 4.2 million euros "
    "in March, payable in two instalments before the end of the year under clause 7.\n",
}
RUN = {"max_steps": 2, "batch_size": 2, "max_seq_len": 512, "save_every": 100, "threads": 2}


def writer(prompt: str) -> str:
    """The synthetic-pair seam: the planted sentence as the answer to its question; for other
    passages, their opening words."""
    passage = prompt.split("Passage:\n", 1)[1].split("\n\nReply in exactly", 1)[0]
    if "ORCHID-4471" in passage:
        return f"Question: {QUESTION}\nAnswer: {PLANTED}"
    head = passage.split()
    return f"Question: What does the text say about {' '.join(head[:6])}?\nAnswer: " + " ".join(
        head[:8]
    )


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, hf_base: Path) -> Iterator[Any]:
    from appliance.wiring import open_core_service, prepare_process

    root = tmp_path_factory.mktemp("audience")
    docs = root / "docs"
    for name, text in DOCS.items():
        (docs / name).parent.mkdir(parents=True, exist_ok=True)
        (docs / name).write_text(text, encoding="utf-8")
    settings = load_settings(
        env={},
        overrides={
            "data_dir": str(root / "data"),
            "service": {"port": 0},
            "metrics": {"port": 0},
            "ingest": {"docs_dir": str(docs), "debounce_s": 0.2, "reconcile_interval_s": 0},
            # the dequantized default model, cached across sessions (tests/finetune/conftest.py)
            "finetune": {"base_model_path": str(hf_base)},
        },
    )
    prepare_process(settings)
    svc = open_core_service(settings, docs, role="tests")
    svc.start()
    accounts = svc.accounts
    accounts.add_user("clerk", PASSWORD, role="staff", groups=["hr-team"])
    accounts.add_user("lawyer", PASSWORD, role="staff", groups=["legal-team"])
    accounts.add_user("boss", PASSWORD, role="admin", groups=["legal-team"])
    accounts.grant("hr-team", ["hr"])
    accounts.grant("legal-team", ["legal"])
    yield svc
    svc.stop()
    svc.ingestion.close()


def client_for(service: Any, username: str | None = None) -> ServiceClient:
    client = ServiceClient.find(service.settings.data_dir)
    assert client is not None
    if username is None:
        return client
    session = client.call("POST", "/auth/login", {"username": username, "password": PASSWORD})
    return client.with_session(session["session"])


@pytest.fixture(scope="module")
def tuned(service: Any) -> dict[str, Any]:
    """Dataset from the hr collection, fine-tuned, registered and activated."""
    from appliance.commands.dataset import ApplianceSources
    from appliance.run_tools import run_tools
    from finetune import runs
    from finetune.dataset import build_dataset

    settings = service.settings
    info = build_dataset(
        settings,
        ["docs"],
        "hr-only",
        generate=writer,
        collections=["hr"],
        reader=ApplianceSources(settings),
    )
    records = [
        json.loads(line)
        for path in (info.train_path, info.heldout_path)
        for line in path.read_text().splitlines()
    ]
    assert any("ORCHID-4471" in r["messages"][-1]["content"] for r in records), records
    assert info.heldout >= 1  # the gate's held-out set
    folder = runs.create_run(settings, "hr-only", overrides=RUN, requested_by="boss")
    final = runs.execute(
        settings, folder, tools=run_tools(settings), progress=False, activate=False
    )
    version = str(final["version"])
    # The admin activates it whatever the tiny run's gate said (not the point here).
    boss = client_for(service, "boss")
    reply = boss.call("POST", "/admin/models/activate", {"version": version, "force": True})
    assert reply["active"] == version
    return {"dataset": info, "run": folder, "version": version}


def ask(client: ServiceClient, question: str = QUESTION) -> dict[str, Any]:
    events = list(client.stream("/ask", {"question": question, "stream": True}))
    sources = next(e for e in events if e["type"] == "sources")
    answer = next(e for e in events if e["type"] == "answer")["answer"]
    assert sources["served_by"] == answer["served_by"]  # known before the first token
    return answer


def test_the_audience_travels_from_dataset_to_run_to_registry(
    service: Any, tuned: dict[str, Any]
) -> None:
    from finetune.registry import ModelRegistry

    assert tuned["dataset"].audience == ["hr"]
    request = json.loads((tuned["run"] / "request.json").read_text())
    config = json.loads((tuned["run"] / "config.json").read_text())
    assert request["audience"] == config["audience"] == ["hr"]
    record = ModelRegistry(service.settings.models_dir).get(tuned["version"])
    assert (record["audience"], record["active"]) == (["hr"], True)


def test_a_user_without_the_grant_is_never_served_the_version(
    service: Any, tuned: dict[str, Any]
) -> None:
    version = tuned["version"]
    clerk, lawyer, boss = (client_for(service, u) for u in ("clerk", "lawyer", "boss"))
    served = ask(clerk)["served_by"]
    assert (served["version"], served["audience"]) == (version, ["hr"])
    for client in (lawyer, boss):  # staff and an admin, neither granted hr
        for question in (QUESTION, "Tell me the archive code.", "When does the office open?"):
            answer = ask(client, question)
            assert answer["served_by"]["version"] == "base", answer["served_by"]
            assert answer["served_by"]["audience"] == []
            assert "ORCHID" not in answer["answer"]
    # the host's operator (no session) reads every collection: the active version
    assert ask(client_for(service))["served_by"]["version"] == version

    # the audit log names the version that answered each question
    ends = [r for r in read(service.settings.audit_path, event="answer_end")]
    by_user = {(r["user"], r["data"]["model_version"]) for r in ends if r["data"].get("message")}
    assert ("clerk", version) in by_user
    assert {v for u, v in by_user if u in ("lawyer", "boss")} == {"base"}
    questions = [r for r in read(service.settings.audit_path, event="question")]
    assert {r["data"]["model_version"] for r in questions if r["user"] == "lawyer"} == {"base"}

    # a revoked grant takes effect at the next question
    service.accounts.revoke("hr-team", ["hr"])
    try:
        assert ask(clerk)["served_by"]["version"] == "base"
    finally:
        service.accounts.grant("hr-team", ["hr"])


def test_the_gate_report_obeys_grants(service: Any, tuned: dict[str, Any]) -> None:
    from appliance.core.errors import ServiceError

    run = tuned["run"].name
    boss = client_for(service, "boss")  # an admin without the hr grant
    with pytest.raises(ServiceError) as denied:
        boss.download("/admin/finetune/file", {"run": run, "kind": "gate"})
    assert denied.value.status == 403
    operator = client_for(service)
    _name, _type, page = operator.download("/admin/finetune/file", {"run": run, "kind": "gate"})
    assert page
    reads = [r for r in read(service.settings.audit_path) if r["data"].get("run") == run]
    assert [(r["event"], r["user"]) for r in reads][-2:] == [
        ("access_denied", "boss"),
        ("admin", "local:operator"),
    ]
