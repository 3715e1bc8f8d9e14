"""Audiences of training data: every record names the collections it drew on and whose feedback
it came from; ``--collections`` restricts the sources; the manifest, the run request and the
registry carry the audience to the model version."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.cli import main
from appliance.commands.dataset import ApplianceSources
from appliance.conversations import ConversationStore
from appliance.core.errors import ApplianceError
from appliance.core.settings import Settings
from finetune import runs
from finetune.audience import dataset_audience, parse_collections
from finetune.data import load_dataset
from finetune.dataset import build_dataset
from finetune.registry import ModelRegistry
from tests.finetune.test_dataset import grounded_seam, rate, source, write_jsonl

HR = "Every employee is entitled to 28 days of paid annual leave per calendar year. Up to 5 "
LEGAL = "The Hartwell settlement was agreed at 4.2 million euros in March under clause 7. "
SHARED = "The office opens at 8 in the morning and closes at 6 in the evening on weekdays. "


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def all_records(info: Any) -> list[dict[str, Any]]:
    return records(info.train_path) + records(info.heldout_path)


def feedback_store(settings: Settings) -> ConversationStore:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return ConversationStore(settings.conversations_path)


def test_parse_collections() -> None:
    assert parse_collections(None) is None
    assert parse_collections(["hr,legal", "ops"]) == {"hr", "legal", "ops"}
    assert parse_collections(["hr,."]) == {"hr", ""}
    with pytest.raises(ApplianceError, match="not a collection"):
        parse_collections(["../etc"])


def test_feedback_records_name_collections_and_users(settings: Settings) -> None:
    store = feedback_store(settings)
    rate(
        store,
        "How much leave do staff get?",
        "28 days [1].",
        "up",
        [source(1, HR, "hr/a.md")],
        user="clerk",
    )
    rate(
        store,
        "When does the office open?",
        "At 8 [1].",
        "up",
        [source(1, SHARED, "w.md")],
        user="lawyer",
    )
    rate(
        store,
        "How much was the settlement?",
        "4.2 million [1][2].",
        "up",
        [source(1, LEGAL, "legal/s.md"), source(2, SHARED, "w.md")],
        user="lawyer",
    )
    rate(
        store,
        "How much was the settlement?",
        "Nothing.",
        "down",
        [source(1, HR, "hr/a.md")],
        user="clerk",
    )
    store.close()

    info = build_dataset(settings, ["feedback"], "everything", reader=ApplianceSources(settings))
    by_question = {
        r["messages"][1]["content"].rsplit("Question: ", 1)[1]: r for r in all_records(info)
    }
    assert by_question["How much leave do staff get?"]["collections"] == ["hr"]
    assert by_question["How much leave do staff get?"]["user"] == "clerk"
    assert by_question["When does the office open?"]["collections"] == [""]
    assert by_question["How much was the settlement?"]["collections"] == ["", "legal"]
    [pair] = records(info.preferences_path)
    # the rejected answer was written from an hr passage: the pair carries both
    assert pair["collections"] == ["", "hr", "legal"]
    assert (pair["user"], pair["rejected_by"]) == ("lawyer", "clerk")
    assert info.audience == ["", "hr", "legal"]
    assert info.manifest["feedback_users"] == ["clerk", "lawyer"]
    assert info.summary()["audience"] == ["", "hr", "legal"]

    narrow = build_dataset(
        settings,
        ["feedback"],
        "legal-only",
        collections=["legal", ""],
        reader=ApplianceSources(settings),
    )
    assert narrow.audience == ["", "legal"]
    kept = all_records(narrow)
    assert {tuple(r["collections"]) for r in kept} <= {("",), ("", "legal")}
    assert narrow.rejected["outside_collections"] == 2  # the hr answer and the pair
    assert narrow.preferences == 0
    assert narrow.manifest["settings"]["collections"] == ["", "legal"]


def test_feedback_from_a_version_of_unknown_audience_is_left_out(settings: Settings) -> None:
    """A fine-tune can repeat what it learned: its answers carry its audience into the next
    dataset, and a version whose audience is unknown cannot vouch for its answers."""
    models = settings.models_dir
    models.mkdir(parents=True)
    base, old, tuned = (models / n for n in ("base.gguf", "old.gguf", "tuned.gguf"))
    for i, path in enumerate((base, old, tuned)):
        path.write_bytes(b"GGUF" + bytes([i]) * 64)
    registry = ModelRegistry(models)
    registry.ensure_base(base)
    registry.register({"gguf": {"path": str(old)}})  # before audiences: unknown
    registry.register({"gguf": {"path": str(tuned)}, "audience": ["hr"]})
    names = {
        v["version"]: f"{Path(v['gguf']).name}@sha256:{v['gguf_file']['sha256'][:12]}"
        for v in registry.versions()
    }

    store = feedback_store(settings)
    for question, model in (
        ("Q one about the office?", "v1"),
        ("Q two about the office?", "v2"),
        ("Q three about the office?", "base"),
    ):
        conversation = store.create("lawyer", question)
        message = store.add(
            "lawyer",
            conversation,
            {
                "question": question,
                "answer": "At 8 [1].",
                "sources": [source(1, SHARED, "w.md")],
                "model": names[model],
            },
        )
        store.add_feedback("lawyer", message, "up", "")
    store.close()
    info = build_dataset(settings, ["feedback"], "lineage", reader=ApplianceSources(settings))
    assert info.rejected["model_audience_unknown"] == 1
    by_question = {
        r["messages"][1]["content"].rsplit("Question: ", 1)[1]: r["collections"]
        for r in all_records(info)
    }
    assert by_question == {"Q two about the office?": ["", "hr"], "Q three about the office?": [""]}


def test_file_records_may_name_their_collections(settings: Settings, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"instruction": "Which form is for leave?", "response": "F-1.", "collections": ["hr"]},
            {"instruction": "Which form is for travel?", "response": "F-2."},
        ],
    )
    info = build_dataset(settings, [str(path)], "from-file")
    assert info.audience == ["hr"]
    assert {tuple(r["collections"]) for r in all_records(info)} == {("hr",), ()}
    assert all(r["user"] is None for r in all_records(info))
    only_shared = build_dataset(settings, [str(path)], "no-hr", collections=[""])
    assert (only_shared.train + only_shared.heldout, only_shared.audience) == (1, [])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "output": "y", "collections": "hr"}])
    with pytest.raises(ApplianceError, match="'collections' must be a list"):
        build_dataset(settings, [str(bad)], "bad")


@pytest.fixture
def indexed(settings: Settings) -> Iterator[Any]:
    """A real tiny index (hashing embedder) over a shared document and two collections."""
    from appliance.wiring import open_ingestion
    from tests.embedders import HashingEmbedder

    docs = settings.ingest.docs_dir
    for name, text in {"welcome.md": SHARED, "hr/leave.md": HR, "legal/deal.md": LEGAL}.items():
        (docs / name).parent.mkdir(parents=True, exist_ok=True)
        (docs / name).write_text(f"# {name}\n\n{text * 3}\n")
    ingestion = open_ingestion(settings, docs, role="tests", embedder=HashingEmbedder(64))
    assert ingestion.indexer.reconcile().failed == 0
    yield ingestion
    ingestion.close()


def test_docs_are_sampled_only_from_the_collections_named(settings: Settings, indexed: Any) -> None:
    indexed.close()  # the build takes the data folder's ownership itself
    info = build_dataset(
        settings,
        ["docs"],
        "hr-docs",
        generate=grounded_seam,
        collections=["hr"],
        reader=ApplianceSources(settings),
    )
    assert info.audience == ["hr"]
    assert {tuple(r["collections"]) for r in all_records(info)} == {("hr",)}
    assert all(
        "hr/leave.md" in r["messages"][1]["content"] or r["collections"] == ["hr"]
        for r in all_records(info)
    )
    everything = build_dataset(
        settings, ["docs"], "all-docs", generate=grounded_seam, reader=ApplianceSources(settings)
    )
    assert everything.audience == ["", "hr", "legal"]
    with pytest.raises(ApplianceError, match="no folder 'payroll'"):
        build_dataset(
            settings,
            ["docs"],
            "typo",
            generate=grounded_seam,
            collections=["payroll"],
            reader=ApplianceSources(settings),
        )


@pytest.mark.integration
def test_the_service_route_narrows_chunk_reads_and_audits_them(
    settings: Settings, indexed: Any
) -> None:
    from appliance.api import ServiceClient
    from appliance.core.audit import open_audit_log, read
    from appliance.wiring import assemble_core_service

    audit = open_audit_log(settings)
    service = assemble_core_service(settings, indexed, audit=audit)
    service.api.start()
    try:
        client = ServiceClient.find(settings.data_dir)
        assert client is not None
        rows = client.call("POST", "/admin/chunks", {"limit": 50, "collections": ["legal"]})
        assert rows
        assert {r["file"] for r in rows} == {"legal/deal.md"}
        info = build_dataset(
            settings,
            ["docs"],
            "legal-docs",
            generate=grounded_seam,
            collections=["legal"],
            reader=ApplianceSources(settings),
        )
        assert info.audience == ["legal"]
        docs = next(s for s in info.manifest["sources"] if s["source"] == "docs")
        assert docs["chunks_read_from"] == "service"
    finally:
        service.api.stop()
        audit.close()
    reads = [
        r["data"]
        for r in read(settings.audit_path, event="admin")
        if r["data"].get("action") == "chunks_read"
    ]
    assert [r["collections"] for r in reads] == [["legal"], ["legal"]]


def test_the_run_request_and_the_cli_carry_the_audience(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {
                "instruction": f"Which form is number {i}?",
                "response": f"F-{i}.",
                "collections": ["hr"],
            }
            for i in range(4)
        ],
    )
    data = ["--data-dir", str(settings.data_dir)]
    assert (
        main(
            [
                *data,
                "dataset",
                "build",
                "--from",
                str(path),
                "--out",
                "hr-forms",
                "--collections",
                "hr,.",
                "--json",
            ]
        )
        == 0
    )
    built = json.loads(capsys.readouterr().out)
    assert built["audience"] == ["hr"]
    folder = settings.datasets_dir / "hr-forms"
    assert dataset_audience(folder) == ["hr"]
    assert load_dataset(folder).manifest["settings"]["collections"] == ["", "hr"]
    assert (
        main(
            [
                *data,
                "dataset",
                "build",
                "--from",
                str(path),
                "--out",
                "none",
                "--collections",
                "legal",
            ]
        )
        == 0
    )
    assert "audience (collections it draws on): none" in capsys.readouterr().out
    run = runs.create_run(settings, "hr-forms", overrides={"max_steps": 1})
    request = json.loads((run / "request.json").read_text())
    assert request["audience"] == ["hr"]
    assert runs.list_runs(settings)[0]["audience"] == ["hr"]
