"""Backup and restore: real documents, the real embedding model and Qdrant Edge; a restore into
a fresh data folder answers the same questions with the same chunks; damaged or unsafe backups
are refused before anything is written."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.backup import MANIFEST, BackupError, create_backup, restore_backup
from appliance.cli import main
from appliance.core.audit import AuditLog, verify
from appliance.core.ownership import DataDirLock
from appliance.core.settings import Settings
from tests.ingest.exactness import index_problems
from tests.ingest.fixtures import make_pdf

QUESTIONS = (
    "How long are invoices kept?",
    "How are disks disposed of?",
    "When does the office open?",
    "What is the Hartwell settlement amount?",
)


def write_docs(docs: Path) -> None:
    (docs / "legal").mkdir(parents=True)
    (docs / "legal" / "settlement.md").write_text(
        "# Settlement\n\nThe Hartwell settlement was agreed at 4.2 million euros in March.\n\n"
        "## Payment\n\nPayment is due in three instalments over eighteen months.\n"
    )
    (docs / "welcome.md").write_text(
        "# Welcome\n\nThe office opens at 8 in the morning and closes at 6 in the evening.\n"
    )
    (docs / "travel.md").write_text(
        "# Travel policy\n\nTrain travel is first class above four hours. Hotels are booked "
        "through the travel desk.\n"
    )
    make_pdf(docs / "retention.pdf")


def located(settings: Settings, ingestion: Any) -> list[list[tuple[str, str, Any, Any, Any]]]:
    """Top 3 (chunk id, file, page, heading, start) per question, straight from the store."""
    from ingest.retrieval import retrieve

    indexer = ingestion.searcher
    out = []
    for question in QUESTIONS:
        hits = retrieve(indexer.store, indexer.embedder, indexer.sparse, question, 3)
        out.append(
            [
                (
                    h.id,
                    h.payload["path"],
                    h.payload["page"],
                    h.payload["heading"],
                    h.payload["start"],
                )
                for h in hits
            ]
        )
    return out


def fresh_settings(settings: Settings, data: Path) -> Settings:
    return settings.model_copy(update={"data_dir": data})


@pytest.fixture
def indexed(settings: Settings, real_embedder: Any) -> tuple[Settings, Any]:
    """A data folder with four real documents indexed, a user, a conversation and audit records
    (all closed again), and the results of the questions before the backup."""
    from appliance.accounts import Accounts
    from appliance.conversations import ConversationStore
    from appliance.wiring import open_ingestion

    docs = settings.ingest.docs_dir
    write_docs(docs)
    with open_ingestion(settings, docs, role="tests", embedder=real_embedder) as ingestion:
        report = ingestion.indexer.reconcile()
        assert report.added == 4, report.failures
        before = located(settings, ingestion)
    with Accounts(settings.accounts_path) as accounts:
        accounts.add_user("auditor", "correct horse battery", role="admin")
    ConversationStore(settings.conversations_path).close()  # its database exists, empty
    with AuditLog(settings.audit_path) as audit:
        audit.record("login", "auditor", client="")
        audit.record("admin", "auditor", action="user_create", target="auditor", role="admin")
    return settings, before


@pytest.mark.slow
def test_restore_into_a_fresh_folder_gives_the_same_answers(
    indexed: tuple[Settings, Any], real_embedder: Any, tmp_path: Path
) -> None:
    from appliance.accounts import Accounts
    from appliance.wiring import open_ingestion

    settings, before = indexed
    backup = tmp_path / "backups" / "appliance.tar.gz"
    started = time.monotonic()
    assert main(["--data-dir", str(settings.data_dir), "backup", str(backup)]) == 0
    backup_s = time.monotonic() - started
    with tarfile.open(backup) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile(MANIFEST))  # type: ignore[arg-type]
    assert names[-1] == MANIFEST
    assert {"ingest.sqlite3", "accounts.sqlite3", "audit/audit.jsonl"} <= set(names)
    assert any(n.startswith("index/") for n in names)
    assert manifest["version"] == 1
    assert manifest["embedding_model_id"] == real_embedder.model_id
    assert manifest["collection"] in manifest["index"]["collections"]
    assert manifest["audit"]["ok"]
    assert manifest["audit"]["records"] == 2
    assert set(manifest["members"]) == set(names) - {MANIFEST}

    fresh = tmp_path / "restored"
    started = time.monotonic()
    assert main(["--data-dir", str(fresh), "restore", str(backup)]) == 0
    restore_s = time.monotonic() - started
    print(f"backup {backup_s:.2f} s ({backup.stat().st_size} bytes), restore {restore_s:.2f} s")

    restored = fresh_settings(settings, fresh)
    assert verify(restored.audit_path).ok
    assert verify(restored.audit_path).last_hash == manifest["audit"]["last_hash"]
    with Accounts(restored.accounts_path) as accounts:
        assert accounts.user("auditor") is not None
    with open_ingestion(
        restored, settings.ingest.docs_dir, role="tests", embedder=real_embedder
    ) as ingestion:
        assert located(restored, ingestion) == before
        assert index_problems(ingestion.indexer) == []
        report = ingestion.indexer.reconcile()  # the restored state equals the folder
        assert (report.added, report.updated, report.removed, report.unchanged) == (0, 0, 0, 4)


@pytest.mark.slow
def test_backup_through_the_running_service(
    settings: Settings, real_embedder: Any, tmp_path: Path
) -> None:
    """With the core service owning the folder, `appliance backup` asks it (writes held)."""
    from appliance.core.audit import read
    from appliance.wiring import open_core_service

    write_docs(settings.ingest.docs_dir)
    settings = settings.model_copy(
        update={"metrics": settings.metrics.model_copy(update={"port": 0})}
    )
    service = open_core_service(settings, settings.ingest.docs_dir, role="tests", answering=False)
    try:
        service.start()
        backup = tmp_path / "live.tar"
        # a second process may not open the store: the CLI must go through the service
        assert main(["--data-dir", str(settings.data_dir), "backup", str(backup), "--json"]) == 0
        assert any(
            r["event"] == "admin" and r["data"].get("action") == "backup"
            for r in read(settings.audit_path)
        )
    finally:
        service.close()
    fresh = fresh_settings(settings, tmp_path / "restored")
    with DataDirLock(fresh.data_dir, "tests"):
        result = restore_backup(fresh, backup)
    assert sum(result["index_points"].values()) > 0


def small_backup(make_indexer: Any, settings: Settings, tmp_path: Path) -> Path:
    """A backup of a data folder indexed with the hashing embedder (fast)."""
    docs = settings.ingest.docs_dir
    docs.mkdir(parents=True)
    for i in range(3):
        (docs / f"note{i}.md").write_text(f"# Note {i}\n\nThe note number {i} says hello.\n")
    indexer = make_indexer(docs, data=settings.data_dir)
    assert indexer.reconcile().added == 3
    indexer.store.close()  # the backup reads the shard folder as a stopped owner leaves it
    with AuditLog(settings.audit_path) as audit:
        audit.record("login", "someone", client="")
    backup = tmp_path / "small.tar"
    with DataDirLock(settings.data_dir, "tests"):
        create_backup(settings, backup)
    return backup


def rewrite(src: Path, dest: Path, change: dict[str, bytes | None], extra: list[Any]) -> None:
    """Copy a backup, replacing (bytes) or dropping (None) members and appending others."""
    with tarfile.open(src) as old, tarfile.open(dest, "w") as new:
        for member in old:
            if member.name in change:
                data = change[member.name]
                if data is None:
                    continue
                member.size = len(data)
                new.addfile(member, io.BytesIO(data))
            else:
                new.addfile(member, old.extractfile(member) if member.isfile() else None)
        for info, data in extra:
            new.addfile(info, io.BytesIO(data) if data is not None else None)


def test_a_tampered_member_is_refused(
    make_indexer: Any, settings: Settings, tmp_path: Path
) -> None:
    backup = small_backup(make_indexer, settings, tmp_path)
    with tarfile.open(backup) as tar:
        audit = tar.extractfile("audit/audit.jsonl").read()  # type: ignore[union-attr]
    tampered = tmp_path / "tampered.tar"
    rewrite(backup, tampered, {"audit/audit.jsonl": audit.replace(b"someone", b"nobody!")}, [])
    target = fresh_settings(settings, tmp_path / "target")
    with pytest.raises(BackupError, match="does not match its sha256"):
        restore_backup(target, tampered)
    assert not target.data_dir.exists() or not any(target.data_dir.iterdir())
    assert [p.name for p in tmp_path.iterdir() if "restore-" in p.name] == []  # no staging left


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("../escaped.txt", tarfile.REGTYPE),
        ("index/../../escaped.txt", tarfile.REGTYPE),
        ("/tmp/escaped-absolute.txt", tarfile.REGTYPE),
        ("models/link", tarfile.SYMTYPE),
        ("models/hard", tarfile.LNKTYPE),
    ],
)
def test_unsafe_members_are_refused(
    make_indexer: Any, settings: Settings, tmp_path: Path, name: str, kind: bytes
) -> None:
    backup = small_backup(make_indexer, settings, tmp_path)
    info = tarfile.TarInfo(name)
    info.type = kind
    payload = b"owned\n"
    if kind == tarfile.REGTYPE:
        info.size = len(payload)
    else:
        info.linkname = "/etc/passwd"
    evil = tmp_path / "evil.tar"
    rewrite(backup, evil, {}, [(info, payload if kind == tarfile.REGTYPE else None)])
    target = fresh_settings(settings, tmp_path / "deep" / "target")
    with pytest.raises(BackupError, match="refused"):
        restore_backup(target, evil)
    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "deep" / "escaped.txt").exists()
    assert not Path("/tmp/escaped-absolute.txt").exists()


def test_a_missing_or_extra_member_and_a_foreign_file_are_refused(
    make_indexer: Any, settings: Settings, tmp_path: Path
) -> None:
    backup = small_backup(make_indexer, settings, tmp_path)
    target = fresh_settings(settings, tmp_path / "target")
    dropped = tmp_path / "dropped.tar"
    rewrite(backup, dropped, {"accounts.sqlite3": None, "ingest.sqlite3": None}, [])
    with pytest.raises(BackupError, match="is missing"):
        restore_backup(target, dropped)
    foreign = tmp_path / "foreign.tar"
    with tarfile.open(foreign, "w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(BackupError, match=r"not an appliance backup|has no manifest"):
        restore_backup(target, foreign)


def test_restore_refuses_a_used_folder_unless_forced_and_keeps_the_old_data(
    make_indexer: Any, settings: Settings, tmp_path: Path
) -> None:
    backup = small_backup(make_indexer, settings, tmp_path)
    target = fresh_settings(settings, tmp_path / "used")
    target.data_dir.mkdir()
    (target.data_dir / "ingest.sqlite3").write_bytes(b"older data")
    assert main(["--data-dir", str(target.data_dir), "restore", str(backup)]) == 1
    assert (target.data_dir / "ingest.sqlite3").read_bytes() == b"older data"
    assert main(["--data-dir", str(target.data_dir), "restore", str(backup), "--force"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("used.before-restore-")]
    assert len(aside) == 1
    assert (aside[0] / "ingest.sqlite3").read_bytes() == b"older data"
    assert verify(target.audit_path).ok


def test_server_mode_backs_up_local_state_only_and_says_so(
    make_indexer: Any, settings: Settings, tmp_path: Path
) -> None:
    small_backup(make_indexer, settings, tmp_path)
    server = settings.model_copy(
        update={
            "store": settings.store.model_copy(
                update={"mode": "server", "url": "http://127.0.0.1:6333"}
            )
        }
    )
    backup = tmp_path / "server.tar"
    with DataDirLock(server.data_dir, "tests"):
        manifest = create_backup(server, backup)
    assert manifest["index"]["included"] is False
    assert "Qdrant server" in manifest["index"]["note"]
    assert not any(name.startswith("index/") for name in manifest["members"])
    result = restore_backup(fresh_settings(server, tmp_path / "t"), backup)
    assert any("Qdrant server" in note for note in result["notes"])


def test_models_by_reference_or_included(
    make_indexer: Any, settings: Settings, tmp_path: Path
) -> None:
    models = settings.models_dir
    (models / "chat-v1").mkdir(parents=True)
    (models / "chat-v1" / "model.gguf").write_bytes(b"GGUF" + b"\0" * 1000)
    (models / "registry.json").write_text(json.dumps({"active": "chat-v1"}))
    small_backup(make_indexer, settings, tmp_path)
    for include, name in ((False, "ref.tar"), (True, "full.tar")):
        backup = tmp_path / name
        with DataDirLock(settings.data_dir, "tests"):
            manifest = create_backup(settings, backup, include_models=include)
        assert [f["path"] for f in manifest["models"]["files"]] == ["models/chat-v1/model.gguf"]
        assert ("models/chat-v1/model.gguf" in manifest["members"]) is include
        assert "models/registry.json" in manifest["members"]
        result = restore_backup(fresh_settings(settings, tmp_path / f"r-{name}"), backup)
        assert result["missing_models"] == ([] if include else ["models/chat-v1/model.gguf"])
