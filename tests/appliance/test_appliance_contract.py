"""One suite for both ``Appliance`` implementations: the data folder opened in this process
(``LocalAppliance``) and the running core service (``RemoteAppliance``, a real service on
loopback in a thread). The CLI's commands run against each and must print the same JSON
shapes; the protocol's operations must return the same shapes. Real models, real store."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.appliance import Appliance
from appliance.cli import main
from appliance.core.settings import Settings, load_settings

pytestmark = [pytest.mark.slow, pytest.mark.integration]

KINDS = ("local", "remote")
POLICY = (
    "# Records policy\n\n## Retention\n\nThe appliance retains audit logs for 7 years under "
    "policy AP-12.\n\n## Access\n\nOnly administrators may export audit logs.\n"
)
QUESTION = "How long does the appliance retain audit logs?"


@dataclass
class Side:
    kind: str
    settings: Settings
    data: Path
    docs: Path
    service: Any = None  # the core service of the remote side


def _documents(folder: Path) -> Path:
    (folder / "legal").mkdir(parents=True)
    (folder / "policy.md").write_text(POLICY)
    (folder / "legal" / "contract.txt").write_text(
        "SERVICE AGREEMENT\n\nThe supplier shall deliver the goods within 30 days of the order.\n"
    )
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    return folder


def _settings(root: Path, docs: Path) -> Settings:
    return load_settings(
        env={},
        overrides={
            "data_dir": str(root / "data"),
            "service": {"port": 0},
            "metrics": {"port": 0},
            "ingest": {"docs_dir": str(docs), "debounce_s": 0.2, "reconcile_interval_s": 0},
            "chat": {"n_threads": 2},
        },
    )


@pytest.fixture(scope="module")
def sides(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Side]]:
    """The same documents in two data folders: one indexed by a command and then closed, one
    owned by a running core service."""
    from appliance.wiring import connect, open_core_service, prepare_process

    out: dict[str, Side] = {}
    for kind in KINDS:
        root = tmp_path_factory.mktemp(f"contract-{kind}")
        docs = _documents(root / "docs")
        settings = _settings(root, docs)
        out[kind] = Side(kind, settings, settings.data_dir, docs)
    prepare_process(out["local"].settings)
    from appliance.core.audit import open_audit_log

    # The service audits from its start; give the other folder an audit log too, so that the
    # backups differ in nothing but where they were made.
    with open_audit_log(out["local"].settings) as audit:
        audit.record("admin", "local:tests", action="contract")
    with connect(out["local"].settings, role="tests", docs_dir=out["local"].docs) as local:
        assert local.kind == "local"
        local.reconcile(out["local"].docs)
    remote = out["remote"]
    service = open_core_service(remote.settings, remote.docs, role="tests")
    try:
        service.start()
        deadline = time.monotonic() + 120
        while service.status()["documents"] < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        remote.service = service
        yield out
    finally:
        service.close()


def cli(
    side: Side, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str
) -> Any:
    """``appliance ARGV`` in this process on ``side``'s data folder; its one JSON document
    (or, for line-per-question output, the list of lines)."""
    monkeypatch.setenv("APPLIANCE_DATA_DIR", str(side.data))
    monkeypatch.setenv("APPLIANCE_INGEST__DOCS_DIR", str(side.docs))
    monkeypatch.setenv("APPLIANCE_CHAT__N_THREADS", "2")
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    return lines[0] if len(lines) == 1 else lines


def shape(value: Any) -> Any:
    """The JSON shape: keys all the way down, the type of every scalar that is set (a None may
    stand where the other side has a value: a page of a Markdown file is None on both)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if value is None:
        return None
    return (
        "number"
        if isinstance(value, int | float) and not isinstance(value, bool)
        else type(value).__name__
    )


def same_shape(a: Any, b: Any) -> None:
    """Both shapes match, reading a None on either side as "any scalar"."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), (sorted(a), sorted(b))
        for key in a:
            same_shape(a[key], b[key])
    elif isinstance(a, list) and isinstance(b, list):
        if a and b:
            same_shape(a[0], b[0])
    elif a is not None and b is not None:
        assert a == b


def both(
    sides: dict[str, Side],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *argv: str,
) -> tuple[Any, Any]:
    local = cli(sides["local"], monkeypatch, capsys, *argv)
    remote = cli(sides["remote"], monkeypatch, capsys, *argv)
    same_shape(shape(local), shape(remote))
    return local, remote


# --- the CLI's commands -----------------------------------------------------------------------


def test_ingest_prints_the_same_report(sides, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    local, remote = (
        cli(sides[kind], monkeypatch, capsys, "ingest", str(sides[kind].docs), "--json")
        for kind in KINDS
    )
    same_shape(shape(local), shape(remote))
    assert {k: v for k, v in local.items() if k != "seconds"} == {
        k: v for k, v in remote.items() if k != "seconds"
    }
    assert (local["unchanged"], local["failed"]) == (2, 1)


def test_status_without_a_service_is_the_services_minus_what_only_it_knows(
    sides, monkeypatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    local = cli(sides["local"], monkeypatch, capsys, "status", "--json")
    remote = cli(sides["remote"], monkeypatch, capsys, "status", "--json")
    # The service adds what a running process knows (watcher, OCR progress, its own port).
    assert set(local) == {
        "collection",
        "documents",
        "chunks",
        "failed",
        "in_progress",
        "stuck",
        "held_deletions",
    }
    assert set(local) < set(remote)
    assert {k: remote[k] for k in local} == local


def test_search_prints_the_same_results(sides, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    local, remote = both(
        sides,
        monkeypatch,
        capsys,
        "search",
        "How long are audit logs retained?",
        "-k",
        "2",
        "--json",
    )
    assert [(h["path"], h["heading"]) for h in local["results"]] == [
        (h["path"], h["heading"]) for h in remote["results"]
    ]
    assert local["results"][0]["score"] == pytest.approx(remote["results"][0]["score"], abs=1e-4)

    queries = sides["local"].data.parent / "q.jsonl"
    queries.write_text(
        json.dumps({"question": "When must goods be delivered?"})
        + "\n"
        + json.dumps({"question": "Who may export audit logs?"})
        + "\n"
    )
    local, remote = both(sides, monkeypatch, capsys, "search", "--queries", str(queries), "-k", "1")
    assert [line["results"][0]["path"] for line in local] == [
        line["results"][0]["path"] for line in remote
    ]


def test_ask_prints_the_same_fields(sides, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    local, remote = both(sides, monkeypatch, capsys, "ask", QUESTION, "--json")
    assert local["sources"][0]["path"] == remote["sources"][0]["path"] == "policy.md"
    assert local["abstained"] is remote["abstained"] is False
    assert local["conversation"]
    assert remote["conversation"]


def test_eval_prints_the_same_report(sides, monkeypatch, capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    golden = tmp_path / "golden.jsonl"
    golden.write_text(
        json.dumps(
            {
                "id": "g1",
                "question": "How long are audit logs retained?",
                "answer": "Audit logs are retained for 7 years under policy AP-12.",
                "evidence_doc": ["policy.md"],
            }
        )
        + "\n"
    )
    local, remote = both(sides, monkeypatch, capsys, "eval", str(golden), "--json")
    assert local["metrics"]["recall_at_k"] == remote["metrics"]["recall_at_k"] == 1.0


def test_backup_prints_the_same_manifest(sides, monkeypatch, capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    local = cli(sides["local"], monkeypatch, capsys, "backup", str(tmp_path / "l.tar"), "--json")
    remote = cli(sides["remote"], monkeypatch, capsys, "backup", str(tmp_path / "r.tar"), "--json")
    # ``members`` is keyed by file: the index's segment names differ between any two folders.
    assert local.keys() == remote.keys()
    for key in local.keys() - {"members"}:
        same_shape(shape(local[key]), shape(remote[key]))
    member = [shape(next(iter(m["members"].values()))) for m in (local, remote)]
    same_shape(*member)
    assert local["index"]["included"] == remote["index"]["included"]


# --- the protocol itself ---------------------------------------------------------------------


def _open(side: Side) -> Appliance:
    from appliance.wiring import connect

    appliance = connect(side.settings, role="tests")
    assert appliance.kind == side.kind
    return appliance


def _both(sides: dict[str, Side], operation: Any) -> tuple[Any, Any]:
    results = []
    for kind in KINDS:
        with _open(sides[kind]) as appliance:
            results.append(operation(appliance))
    same_shape(shape(results[0]), shape(results[1]))
    return results[0], results[1]


def test_documents_chunks_and_groups_have_the_same_shape(sides) -> None:  # type: ignore[no-untyped-def]
    local, remote = _both(sides, lambda a: a.documents()["files"])
    assert [{**f, "indexed_at": None} for f in local] == [{**f, "indexed_at": None} for f in remote]
    local, remote = _both(sides, lambda a: a.chunks(2, 5))
    assert [c["file"] for c in local] == [c["file"] for c in remote]
    local, remote = _both(sides, lambda a: a.groups())
    assert local == remote == {"groups": {}, "collections": ["legal"]}


def test_conversations_and_feedback_have_the_same_shape(sides) -> None:  # type: ignore[no-untyped-def]
    def exchange(appliance: Appliance) -> Any:
        events = list(appliance.ask(QUESTION, user="local:contract"))
        final = events[-1]
        assert final["type"] == "answer"
        conversation = str(final["conversation"])
        listed = appliance.conversations("local:contract")
        messages = appliance.messages("local:contract", conversation)
        ok = appliance.feedback("local:contract", int(final["message"]), "up", "clear")
        renamed = appliance.rename_conversation("local:contract", conversation, "retention")
        titles = [c["title"] for c in appliance.conversations("local:contract")]
        stats = appliance.feedback_stats()
        deleted = appliance.delete_conversation("local:contract", conversation)
        return {
            "final": final,
            "listed": listed,
            "messages": messages,
            "ok": [ok, renamed, deleted],
            "titles": titles,
            "stats": stats,
            "left": appliance.conversations("local:contract"),
        }

    local, remote = _both(sides, exchange)
    assert local["titles"] == remote["titles"] == ["retention"]
    assert local["stats"]["up"] == remote["stats"]["up"] == 1
    assert local["left"] == remote["left"] == []


def test_models_have_the_same_shape(sides) -> None:  # type: ignore[no-untyped-def]
    local, remote = _both(sides, lambda a: a.models())
    assert local["embedding"] == remote["embedding"]
    assert local["active"]["backend"] == remote["active"]["backend"] == "llamacpp"


# --- accounts, models and restore: the admin commands ----------------------------------------


def text_cli(
    side: Side,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *argv: str,
    stdin: str = "",
) -> tuple[int, str, str]:
    import io

    monkeypatch.setenv("APPLIANCE_DATA_DIR", str(side.data))
    monkeypatch.setenv("APPLIANCE_INGEST__DOCS_DIR", str(side.docs))
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_users_commands_print_the_same(sides, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from appliance.core.audit import read

    for kind in KINDS:
        side = sides[kind]
        steps = [
            (
                ("users", "add", "Carol", "--groups", "team", "--password-stdin"),
                "added staff carol",
            ),
            (("users", "grant", "team", "legal", "hr"), "group team: hr, legal"),
            (("users", "revoke", "team", "hr"), "group team: legal"),
            (("users", "groups", "carol", "team", "other"), ""),
            (("users", "disable", "carol"), "disabled carol"),
        ]
        for argv, printed in steps:
            code, out, err = text_cli(side, monkeypatch, capsys, *argv, stdin="a long passphrase\n")
            assert code == 0, (kind, argv, err)
            assert out.strip() == printed, (kind, argv)
        # Audited where the change was made, in the name of who ran the command.
        records = [r for r in read(side.settings.audit_path) if r["event"] == "admin"]
        actions = [
            r["data"]["action"] for r in records if r["data"].get("target") in ("carol", "team")
        ]
        assert actions == ["user_create", "grants", "grants", "user_update", "user_update"], kind
        assert {r["user"] for r in records[-5:]} == {records[-1]["user"]}
        assert str(records[-1]["user"]).startswith("local:")
        assert records[-1]["user"] != "local:operator"
    local, remote = both(sides, monkeypatch, capsys, "users", "list", "--json")
    assert local["groups"] == remote["groups"] == {"other": [], "team": ["legal"]}
    carol = [
        next(u for u in listed["users"] if u["username"] == "carol") for listed in (local, remote)
    ]
    moments = ("created", "password_changed")
    assert [{k: v for k, v in c.items() if k not in moments} for c in carol] == [
        {k: v for k, v in carol[1].items() if k not in moments}
    ] * 2
    assert carol[0]["role"] == "staff"
    assert sorted(carol[0]["groups"]) == ["other", "team"]
    assert carol[0]["disabled"]


def test_models_commands_print_the_same(sides, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    local, remote = both(sides, monkeypatch, capsys, "models", "list", "--json")
    assert [(v["version"], v["active"]) for v in local] == [("base", True)]
    assert [(v["version"], v["active"]) for v in remote] == [("base", True)]
    for kind in KINDS:
        code, out, err = text_cli(sides[kind], monkeypatch, capsys, "models", "activate", "base")
        assert code == 0, err
        assert out.startswith("activated base (was base)")
    local, remote = _both(sides, lambda a: a.activate_model("base", operator="contract"))
    assert local == remote == {"active": "base", "switch_error": None}


def test_restore_is_refused_while_a_service_owns_the_folder(
    sides, monkeypatch, capsys, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    code, out, err = text_cli(
        sides["remote"], monkeypatch, capsys, "restore", str(tmp_path / "x.tar")
    )
    assert code != 0
    assert out == ""
    assert "the core service is running" in err
    assert "stop it before restoring" in err
    # Without a service the restore itself runs (and reads the file it is given).
    code, out, err = text_cli(
        sides["local"], monkeypatch, capsys, "restore", str(tmp_path / "x.tar")
    )
    assert code != 0
    assert "the core service is running" not in err
