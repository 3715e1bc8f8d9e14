"""Dataset builds: file formats, feedback in the answering prompt format, preference pairs, the
golden-overlap drop, the split, the content hash, chunks read locally and through the core
service's route, and the ``appliance dataset`` commands."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.cli import main
from appliance.commands.dataset import ApplianceSources
from appliance.conversations import ConversationStore
from appliance.core.prompting import SYSTEM_PROMPT, Passage, user_prompt
from appliance.core.settings import Settings
from finetune.data import DatasetError, Example, list_datasets, load_dataset
from finetune.dataset import build_dataset, dataset_from_file, split_heldout
from finetune.sources import feedback_examples, preference_pairs, read_instruction_file
from finetune.synthetic import QA_PROMPT

CONTEXT = "The appliance retains audit logs for 7 years under policy AP-12."


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n",
        encoding="utf-8",
    )
    return path


def pairs_file(tmp_path: Path, n: int = 10, name: str = "pairs.jsonl") -> Path:
    return write_jsonl(
        tmp_path / name,
        [
            {"instruction": f"What is the code of form number {i}?", "response": f"It is F-{i}."}
            for i in range(n)
        ],
    )


def source(number: int, text: str, path: str = "policy.md") -> dict[str, Any]:
    return {
        "number": number,
        "path": path,
        "page": None,
        "heading": "Retention",
        "text": text,
        "score": 0.8,
        "start": 0,
        "end": len(text),
        "doc_hash": "abc",
    }


def rate(
    store: ConversationStore,
    question: str,
    answer: str,
    rating: str,
    sources: list[dict[str, Any]],
    user: str = "ann",
) -> None:
    conversation = store.create(user, question)
    message = store.add(
        user, conversation, {"question": question, "answer": answer, "sources": sources}
    )
    store.add_feedback(user, message, rating, "")


# --- admin files ---------------------------------------------------------------------------------


def test_file_formats(tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who approves leave?"},
        {"role": "assistant", "content": "The line manager."},
    ]
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"messages": messages},
            {
                "instruction": "How long are audit logs kept?",
                "response": "7 years [1].",
                "context": CONTEXT,
            },
            {"prompt": "Say hello.", "output": "Hello."},
            "",
            {"question": "Which policy?", "answer": "AP-12 [1].", "input": CONTEXT},
        ],
    )
    examples = read_instruction_file(path, SYSTEM_PROMPT)
    assert [e.source for e in examples] == ["file"] * 4
    assert examples[0].as_json()["messages"] == messages  # kept exactly as given
    grounded = examples[1].as_json()["messages"]
    passage = Passage(1, "", None, None, CONTEXT, 0.0, 0, len(CONTEXT), "", ())
    assert grounded == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user_prompt("How long are audit logs kept?", [passage])},
        {"role": "assistant", "content": "7 years [1]."},
    ]
    assert examples[2].as_json()["messages"][1] == {"role": "user", "content": "Say hello."}
    assert examples[3].question == "Which policy?"


def test_malformed_lines_are_reported_by_number(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"instruction": "fine", "response": "yes"},
            "{not json",
            {"instruction": "no answer"},
            {"messages": [{"role": "user", "content": "hi"}]},
            {
                "messages": [
                    {"role": "robot", "content": "hi"},
                    {"role": "assistant", "content": "x"},
                ]
            },
            ["a list"],
        ],
    )
    with pytest.raises(DatasetError) as info:
        read_instruction_file(path, SYSTEM_PROMPT)
    message = str(info.value)
    assert "5 malformed line(s)" in message
    for n in (2, 3, 4, 5, 6):
        assert f"line {n}:" in message
    assert "line 1:" not in message
    assert "last message must be the assistant" in message
    assert "role 'robot'" in message
    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DatasetError, match="no examples"):
        read_instruction_file(empty, SYSTEM_PROMPT)


# --- feedback ------------------------------------------------------------------------------------


def test_feedback_becomes_answering_format_records(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "conversations.sqlite3")
    retention = "The appliance retains audit logs for 7 years under policy AP-12."
    export = "Only administrators may export audit logs."
    rate(
        store,
        "How long are audit logs kept, and who exports them?",
        "Audit logs are kept 7 years [2]; administrators export them [4].",
        "up",
        [source(2, retention), source(4, export)],
    )
    rate(store, "What is the lunch menu?", "The documents do not cover this question.", "up", [])
    rate(store, "Who exports logs?", "Anyone [1].", "down", [source(1, export)])
    examples, rejected = feedback_examples(store.feedback(), SYSTEM_PROMPT)
    store.close()
    assert rejected == {"feedback_no_context": 1}
    assert len(examples) == 1
    record = examples[0].as_json()
    assert record["source"] == "feedback"
    # the cited passages, renumbered 1..n, in the prompt the answering engine builds
    passages = [
        Passage(1, "policy.md", None, "Retention", retention, 0.8, 0, len(retention), "abc", ()),
        Passage(2, "policy.md", None, "Retention", export, 0.8, 0, len(export), "abc", ()),
    ]
    assert record["messages"] == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {
            "role": "user",
            "content": user_prompt("How long are audit logs kept, and who exports them?", passages),
        },
        {
            "role": "assistant",
            "content": "Audit logs are kept 7 years [1]; administrators export them [2].",
        },
    ]
    assert record["messages"][1]["content"].startswith("Context:\n[2] Only administrators")


def test_preference_pairs_from_up_and_down_answers(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "conversations.sqlite3")
    retention = "The appliance retains audit logs for 7 years under policy AP-12."
    other = "Logs of the mail server are deleted after 30 days."
    question = "How long does the appliance retain its audit logs?"
    rate(store, question, "For 7 years under AP-12 [3].", "up", [source(3, retention)])
    # a near-duplicate wording of the same question, answered badly
    rate(
        store,
        "How long does the appliance retain its audit logs ?",
        "For 30 days [1], see also [2].",
        "down",
        [source(1, other), source(2, retention)],
        user="bob",
    )
    rate(
        store,
        "how long does the appliance retain its audit logs now?",
        "Forever.",
        "down",
        [],
        user="cy",
    )
    # the same answer rated both ways teaches nothing
    rate(store, "Who signs contracts?", "The CFO [1].", "up", [source(1, "The CFO signs.")])
    rate(
        store, "Who signs contracts?", "The CFO [1].", "down", [source(1, "The CFO signs.")], "dan"
    )
    # a thumbs-down alone has nothing to prefer
    rate(store, "What is the office address?", "Mars.", "down", [])
    pairs = preference_pairs(store.feedback(), SYSTEM_PROMPT)
    store.close()
    assert sorted(p.rejected for p in pairs) == ["For 30 days, see also [1].", "Forever."]
    for pair in pairs:
        record = pair.as_json()
        assert record["chosen"] == "For 7 years under AP-12 [1]."
        assert [m["role"] for m in record["prompt"]] == ["system", "user"]
        assert record["prompt"][1]["content"] == user_prompt(
            question,
            [
                Passage(
                    1, "policy.md", None, "Retention", retention, 0.8, 0, len(retention), "abc", ()
                )
            ],
        )


# --- building ------------------------------------------------------------------------------------


def test_golden_overlap_is_dropped(settings: Settings, tmp_path: Path) -> None:
    golden = write_jsonl(
        tmp_path / "golden.jsonl",
        [
            {
                "id": "g1",
                "question": "What were Apple's total net sales in the third quarter of 2023?",
                "answer": "$81,797 million",
                "evidence_doc": ["a.pdf"],
            },
            {
                "id": "g2",
                "question": "Who approves carried-over leave?",
                "answer": "The line manager approves it.",
                "evidence_doc": ["b.pdf"],
            },
        ],
    )
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            # the same normalized question
            {"question": "who approves carried over leave", "answer": "HR."},
            # a near-duplicate question
            {
                "question": "What was Apple's total net sales in the third quarter of 2023",
                "answer": "A lot.",
            },
            # the same answer to another question
            {
                "question": "Whose signature does leave carry-over need?",
                "answer": "The line manager approves it [1].",
            },
            {"question": "How long are audit logs kept?", "answer": "7 years."},
            {"question": "Who exports audit logs?", "answer": "Administrators."},
        ],
    )
    info = build_dataset(settings, [str(path)], "leak", golden=golden)
    assert info.dropped_for_golden_overlap == 3
    assert info.train + info.heldout == 2
    kept = [
        json.loads(line)
        for p in (info.train_path, info.heldout_path)
        for line in p.read_text().splitlines()
    ]
    assert {r["messages"][1]["content"] for r in kept} == {
        "How long are audit logs kept?",
        "Who exports audit logs?",
    }
    # the golden set in the settings is used when none is given
    settings.finetune.golden_path = golden
    assert build_dataset(settings, [str(path)], "leak2").dropped_for_golden_overlap == 3
    assert load_dataset(info.path).manifest["settings"]["golden_path"] == str(golden)


def test_split_is_seeded_stratified_and_never_empty() -> None:
    def examples(source: str, n: int) -> list[Example]:
        return [
            Example((("user", f"{source} q{i}"), ("assistant", "a")), source, f"q{i}", "a")
            for i in range(n)
        ]

    data = examples("file", 30) + examples("feedback", 10)
    train, held = split_heldout(data, 0.1, seed=3)
    assert (len(train), len(held)) == (36, 4)
    assert sorted(e.source for e in held) == ["feedback", "file", "file", "file"]
    assert split_heldout(list(reversed(data)), 0.1, seed=3) == (train, held)  # order-free
    assert {e.id for e in split_heldout(data, 0.1, seed=4)[1]} != {e.id for e in held}
    assert [len(part) for part in split_heldout(examples("file", 2), 0.1, 0)] == [1, 1]
    assert [len(part) for part in split_heldout(examples("file", 1), 0.5, 0)] == [1, 0]
    assert [len(part) for part in split_heldout(examples("file", 5), 0.0, 0)] == [5, 0]


def test_manifest_hash_is_stable_and_follows_content(settings: Settings, tmp_path: Path) -> None:
    path = pairs_file(tmp_path)
    first = build_dataset(settings, [str(path)], "one", seed=7)
    second = build_dataset(settings, [str(path), str(path)], "two", seed=7)
    assert first.sha256 == second.sha256
    assert (first.train, first.heldout, first.preferences) == (9, 1, 0)
    manifest = first.manifest
    assert manifest["counts_by_source"] == {"file": 10}
    assert manifest["split"] == {"train": 9, "heldout": 1, "preferences": 0}
    assert {"name", "created", "sources", "rejected", "settings", "sha256"} <= manifest.keys()
    assert manifest["settings"]["seed"] == 7

    assert build_dataset(settings, [str(path)], "reseeded", seed=9).sha256 != first.sha256
    changed = pairs_file(tmp_path, 11, "more.jsonl")
    assert build_dataset(settings, [str(changed)], "three", seed=7).sha256 != first.sha256

    first.train_path.write_text(first.train_path.read_text().replace("F-1", "F-X"))
    with pytest.raises(DatasetError, match="changed after it was built"):
        load_dataset(first.path)
    assert {d.name for d in list_datasets(settings)} == {"one", "two", "reseeded", "three"}


def test_names_are_validated_and_builds_are_atomic(settings: Settings, tmp_path: Path) -> None:
    path = pairs_file(tmp_path)
    for bad in ("../escape", "a/b", "a\\b", ".hidden", "", "x" * 81):
        with pytest.raises(DatasetError, match="invalid dataset name"):
            build_dataset(settings, [str(path)], bad)
    build_dataset(settings, [str(path)], "taken")
    with pytest.raises(DatasetError, match="exists already"):
        build_dataset(settings, [str(path)], "taken")
    broken = write_jsonl(tmp_path / "broken.jsonl", ["{oops"])
    with pytest.raises(DatasetError, match="line 1"):
        build_dataset(settings, [str(path), str(broken)], "half")
    with pytest.raises(DatasetError, match="neither"):
        build_dataset(settings, ["nowhere.jsonl"], "missing")
    assert sorted(p.name for p in settings.datasets_dir.iterdir()) == ["taken"]


# --- documents: chunks read locally and through the core service ---------------------------------


def grounded_seam(prompt: str) -> str:
    """A scripted model: asks about the passage's opening and answers with its first words."""
    passage = prompt.split("Passage:\n", 1)[1].split("\n\nReply in exactly", 1)[0]
    head = passage.split()
    question = f"What does the text say about {' '.join(head[:6])}?"
    return f"Question: {question}\nAnswer: {' '.join(head[:8])}"


def test_a_file_becomes_a_dataset_named_after_it_reused_or_suffixed(
    settings: Settings, tmp_path: Path
) -> None:
    path = pairs_file(tmp_path, 10, name="Sig pairs (v1).jsonl")
    made = dataset_from_file(settings, path)
    assert (made.action, made.info.name, made.taken) == ("built", "Sig-pairs-v1", ())
    assert made.message().startswith(f"built dataset 'Sig-pairs-v1' from {path}")
    # Exactly what `dataset build --from FILE` builds: content, split and manifest.
    reference = build_dataset(settings, [str(path)], "reference")
    assert made.info.sha256 == reference.sha256
    for key in ("split", "sources", "counts_by_source", "settings"):
        assert made.info.manifest[key] == reference.manifest[key]
    assert (made.info.path / "heldout.jsonl").read_bytes() == reference.heldout_path.read_bytes()

    again = dataset_from_file(settings, path)
    assert (again.action, again.info.name) == ("reused", "Sig-pairs-v1")
    assert "reusing it" in again.message()

    pairs_file(tmp_path, 12, name="Sig pairs (v1).jsonl")  # the same file, other content
    changed = dataset_from_file(settings, path)
    assert (changed.action, changed.info.name) == ("built", "Sig-pairs-v1-2")
    assert changed.taken == ("Sig-pairs-v1",)
    assert "'Sig-pairs-v1' exists with other content" in changed.message()
    assert load_dataset(settings.datasets_dir / "Sig-pairs-v1").train == made.info.train  # intact
    assert dataset_from_file(settings, path).info.name == "Sig-pairs-v1-2"  # reused, not -3
    summary = changed.summary()
    assert (summary["action"], summary["from"]) == ("built", str(path))


@pytest.fixture
def indexed(settings: Settings, tmp_path: Path) -> Iterator[Any]:
    """A real tiny index (hashing embedder) of three policies, owned by this process."""
    from appliance.wiring import open_ingestion
    from tests.embedders import HashingEmbedder

    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in {
        "retention.md": "The appliance retains audit logs for 7 years under policy AP-12. "
        "Only administrators may export audit logs, and every export is recorded with the "
        "administrator's name and the time.",
        "delivery.md": "The supplier shall deliver the goods within 30 days of the order. "
        "Late deliveries incur a penalty of 2 percent of the order value per week of delay, "
        "up to 10 percent.",
        "leave.md": "Every employee is entitled to 28 days of paid annual leave per calendar "
        "year. Up to 5 unused days may be carried over with the approval of the line manager.",
    }.items():
        (docs / name).write_text(f"# {name}\n\n{text}\n")
    ingestion = open_ingestion(settings, docs, role="tests", embedder=HashingEmbedder(64))
    assert ingestion.indexer.reconcile().failed == 0
    yield ingestion
    ingestion.close()


def test_docs_source_reads_chunks_locally(settings: Settings, indexed: Any) -> None:
    indexed.close()  # the build takes the data folder's ownership itself
    assert QA_PROMPT.startswith("Read the passage")
    info = build_dataset(
        settings,
        ["docs"],
        "synthetic",
        generate=grounded_seam,
        limit=10,
        reader=ApplianceSources(settings),
    )
    docs = next(s for s in info.manifest["sources"] if s["source"] == "docs")
    assert docs["chunks_read_from"] == "local"
    assert docs["chunks_sampled"] == 3
    assert info.sources == {"docs": 3}
    records = [json.loads(line) for line in info.train_path.read_text().splitlines()]
    records += [json.loads(line) for line in info.heldout_path.read_text().splitlines()]
    for record in records:
        system, user, assistant = record["messages"]
        assert system == {"role": "system", "content": SYSTEM_PROMPT}
        assert user["content"].startswith("Context:\n[1] ")
        assert user["content"].split("\n\nQuestion: ")[1].startswith("What does the text say")
        assert assistant["content"].endswith(" [1].")


def test_docs_source_without_an_index_says_what_to_do(settings: Settings) -> None:
    with pytest.raises(DatasetError, match="appliance ingest"):
        build_dataset(
            settings, ["docs"], "nothing", generate=grounded_seam, reader=ApplianceSources(settings)
        )


@pytest.mark.integration
def test_docs_source_reads_chunks_through_the_service(settings: Settings, indexed: Any) -> None:
    from appliance.api import ServiceClient
    from appliance.core.errors import ServiceError
    from appliance.wiring import assemble_core_service
    from finetune.synthetic import sample_chunks

    service = assemble_core_service(settings, indexed)
    service.api.start()  # the API alone: the index is already built
    try:
        client = ServiceClient.find(settings.data_dir)
        assert client is not None
        rows = client.call("POST", "/admin/chunks", {"limit": 2, "seed": 5})
        expected = sample_chunks(indexed.state, indexed.searcher.collection, 2, 5)
        assert rows == [c.as_json() for c in expected]
        assert set(rows[0]) == {"chunk_id", "file", "location", "text"}
        with pytest.raises(ServiceError, match="limit"):
            client.call("POST", "/admin/chunks", {"limit": 0})
        info = build_dataset(
            settings,
            ["docs"],
            "via-service",
            generate=grounded_seam,
            reader=ApplianceSources(settings),
        )
        docs = next(s for s in info.manifest["sources"] if s["source"] == "docs")
        assert docs["chunks_read_from"] == "service"
        assert info.train + info.heldout == 3
    finally:
        service.api.stop()


# --- the command line ----------------------------------------------------------------------------


def test_dataset_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "cli-data"
    path = pairs_file(tmp_path)
    store_path = data / "conversations.sqlite3"
    data.mkdir()
    store = ConversationStore(store_path)
    rate(store, "How long are audit logs kept?", "7 years [1].", "up", [source(1, CONTEXT)])
    rate(store, "How long are audit logs kept?", "Forever [1].", "down", [source(1, CONTEXT)], "bo")
    store.close()

    base = ["--data-dir", str(data), "dataset"]
    code = main(
        [
            *base,
            "build",
            "--from",
            str(path),
            "--from",
            "feedback",
            "--out",
            "v1",
            "--seed",
            "2",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["name"] == "v1"
    assert out["sources"] == {"feedback": 1, "file": 10}
    assert (out["train"], out["heldout"], out["preferences"]) == (10, 1, 1)

    assert main([*base, "build", "--from", str(path), "--out", "v2", "--limit", "4"]) == 0
    text = capsys.readouterr().out
    assert "dataset v2: train 3, heldout 1, preferences 0" in text

    assert main([*base, "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["datasets"]
    assert [d["name"] for d in listed] == ["v1", "v2"]

    assert main([*base, "show", "v1", "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["sha256"] == out["sha256"]

    assert main([*base, "show", "../v1"]) == 1
    assert "invalid dataset name" in capsys.readouterr().err
    assert main([*base, "build", "--from", str(path), "--out", "v1"]) == 1
    assert "exists already" in capsys.readouterr().err
