"""The audit log over real files: chaining, tamper detection, concurrent writers, filters."""

from __future__ import annotations

import json
import multiprocessing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from appliance.core.audit import (
    EVENT_ADMIN,
    EVENT_LOGIN,
    EVENT_QUESTION,
    GENESIS,
    Anchor,
    AuditError,
    AuditLog,
    canonical,
    load_key,
    parse_anchor,
    printable,
    read,
    record_hash,
    verify,
)

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "audit" / "audit.jsonl"


def write_records(path: Path, count: int = 5) -> list[dict[str, Any]]:
    clock = Clock()
    with AuditLog(path, clock=clock) as log:
        out = []
        for n in range(count):
            out.append(log.record(EVENT_LOGIN, f"user{n % 2}", client="10.0.0.1", n=n))
            clock.now += 60
    return out


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def test_records_chain(log_path: Path) -> None:
    records = write_records(log_path, 3)
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[0]["prev"] == GENESIS
    assert records[1]["prev"] == records[0]["hash"]
    assert records[2]["prev"] == records[1]["hash"]
    assert records[0]["time"] == "2025-03-01T12:00:00.000Z"
    assert records[0]["data"] == {"client": "10.0.0.1", "n": 0}
    assert all(record_hash(r) == r["hash"] for r in records)
    on_disk = [json.loads(line) for line in lines(log_path)]
    assert on_disk == records


def test_files_are_owner_only(log_path: Path) -> None:
    write_records(log_path, 1)
    assert log_path.stat().st_mode & 0o777 == 0o600
    assert log_path.parent.stat().st_mode & 0o777 == 0o700


def test_reopening_continues_the_chain(log_path: Path) -> None:
    first = write_records(log_path, 2)
    with AuditLog(log_path) as log:
        third = log.record(EVENT_ADMIN, "root", action="grant", target="finance", paths={"b", "a"})
    assert third["seq"] == 3
    assert third["prev"] == first[-1]["hash"]
    assert third["data"]["paths"] == ["a", "b"]
    result = verify(log_path)
    assert result.ok, result.problem
    assert result.records == 3
    assert result.last_hash == third["hash"]


def test_verify_ok_and_empty(log_path: Path, tmp_path: Path) -> None:
    write_records(log_path, 5)
    assert verify(log_path).ok
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    assert verify(empty).ok
    assert verify(empty).records == 0
    missing = verify(tmp_path / "missing.jsonl")
    assert not missing.ok
    assert "cannot read" in (missing.problem or "")


def test_edited_field_is_detected_with_its_line(log_path: Path) -> None:
    write_records(log_path, 5)
    text = lines(log_path)
    text[2] = text[2].replace('"user":"user0"', '"user":"mallory"')
    log_path.write_text("".join(text), encoding="utf-8")
    result = verify(log_path)
    assert not result.ok
    assert result.records == 2
    assert result.problem is not None
    assert result.problem.startswith("line 3:")
    assert "edited" in result.problem


def test_reformatted_line_is_detected(log_path: Path) -> None:
    write_records(log_path, 3)
    text = lines(log_path)
    text[1] = json.dumps(json.loads(text[1])) + "\n"  # same content, other spacing
    log_path.write_text("".join(text), encoding="utf-8")
    result = verify(log_path)
    assert not result.ok
    assert (result.problem or "").startswith("line 2:")


def test_deleted_middle_line_is_detected(log_path: Path) -> None:
    write_records(log_path, 5)
    text = lines(log_path)
    del text[2]
    log_path.write_text("".join(text), encoding="utf-8")
    result = verify(log_path)
    assert not result.ok
    assert (result.problem or "").startswith("line 3:")
    assert "deleted" in (result.problem or "")


def test_deleted_first_line_is_detected(log_path: Path) -> None:
    write_records(log_path, 3)
    log_path.write_text("".join(lines(log_path)[1:]), encoding="utf-8")
    result = verify(log_path)
    assert not result.ok
    assert (result.problem or "").startswith("line 1:")


def test_swapped_lines_are_detected(log_path: Path) -> None:
    write_records(log_path, 5)
    text = lines(log_path)
    text[1], text[3] = text[3], text[1]
    log_path.write_text("".join(text), encoding="utf-8")
    result = verify(log_path)
    assert not result.ok
    assert (result.problem or "").startswith("line 2:")


def test_inserted_forged_line_is_detected(log_path: Path) -> None:
    records = write_records(log_path, 3)
    forged = {
        "seq": 3,
        "time": records[1]["time"],
        "user": "mallory",
        "event": EVENT_LOGIN,
        "data": {},
        "prev": records[1]["hash"],
    }
    forged["hash"] = record_hash(forged)
    text = lines(log_path)
    text.insert(2, json.dumps(forged, sort_keys=True, separators=(",", ":")) + "\n")
    log_path.write_text("".join(text), encoding="utf-8")
    result = verify(log_path)
    assert not result.ok
    assert (result.problem or "").startswith("line 4:")


def test_truncated_last_line_is_detected_and_stops_appending(log_path: Path) -> None:
    write_records(log_path, 4)
    data = log_path.read_bytes()
    log_path.write_bytes(data[:-20])
    result = verify(log_path)
    assert not result.ok
    assert result.records == 3
    assert (result.problem or "").startswith("line 4: truncated")
    with AuditLog(log_path) as log, pytest.raises(AuditError, match="incomplete"):
        log.record(EVENT_LOGIN, "alice")


def test_garbled_last_line_is_detected(log_path: Path) -> None:
    write_records(log_path, 2)
    with log_path.open("a", encoding="utf-8") as handle:
        handle.write("{not json\n")
    result = verify(log_path)
    assert not result.ok
    assert (result.problem or "").startswith("line 3: garbled")


def test_anchor_detects_removed_tail(log_path: Path) -> None:
    write_records(log_path, 5)
    anchor = verify(log_path).last_hash
    assert verify(log_path, anchor=anchor).ok
    log_path.write_text("".join(lines(log_path)[:3]), encoding="utf-8")
    assert verify(log_path).ok  # a chain alone cannot show a cut tail
    result = verify(log_path, anchor=anchor)
    assert not result.ok
    assert "anchor" in (result.problem or "")


def test_unserialisable_data_is_refused_and_nothing_written(log_path: Path) -> None:
    with AuditLog(log_path) as log:
        with pytest.raises(AuditError, match="JSON"):
            log.record(EVENT_ADMIN, "root", target=object())
        with pytest.raises(AuditError, match="invalid audit event"):
            log.record("Not An Event", "root")
        log.record(EVENT_ADMIN, "root", action="ok")
    assert verify(log_path).records == 1


def _append_many(path: str, writer: str, count: int, start: Any) -> None:
    start.wait()
    with AuditLog(Path(path)) as log:
        for n in range(count):
            log.record(EVENT_QUESTION, writer, n=n)


def test_concurrent_appends_from_two_processes(log_path: Path) -> None:
    AuditLog(log_path).close()
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    workers = [
        ctx.Process(target=_append_many, args=(str(log_path), name, 200, start))
        for name in ("a", "b")
    ]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    result = verify(log_path)
    assert result.ok, result.problem
    assert result.records == 400
    records = list(read(log_path))
    assert [r["seq"] for r in records] == list(range(1, 401))
    for name in ("a", "b"):
        assert [r["data"]["n"] for r in records if r["user"] == name] == list(range(200))


def test_read_filters(log_path: Path) -> None:
    clock = Clock()
    with AuditLog(log_path, clock=clock) as log:
        log.record(EVENT_LOGIN, "alice", client="10.0.0.1")
        clock.now += 3600
        log.record(EVENT_QUESTION, "alice", question="What is the budget?", retrieved=[])
        clock.now += 3600
        log.record(EVENT_LOGIN, "bob", client="10.0.0.2")
        log.record(EVENT_ADMIN, None, action="model_reload")
    assert len(list(read(log_path))) == 4
    assert [r["seq"] for r in read(log_path, user="alice")] == [1, 2]
    assert [r["seq"] for r in read(log_path, event=EVENT_LOGIN)] == [1, 3]
    since = datetime(2025, 3, 1, 13, 0, 0, tzinfo=UTC)
    assert [r["seq"] for r in read(log_path, since=since)] == [2, 3, 4]
    assert [r["seq"] for r in read(log_path, since=since.replace(tzinfo=None))] == [2, 3, 4]
    assert [r["seq"] for r in read(log_path, since=since, user="alice")] == [2]
    assert [r["seq"] for r in read(log_path, event=EVENT_ADMIN)] == [4]
    assert list(read(log_path.parent / "missing.jsonl")) == []


# --- anchors, keys, names (issue 13) ----------------------------------------------------------


def test_a_cut_tail_fails_against_an_anchor(log_path: Path) -> None:
    """Cutting the newest records leaves a valid chain; only an anchor kept outside shows it."""
    write_records(log_path, 6)
    anchor = Anchor(6, verify(log_path).last_hash)
    log_path.write_text("".join(lines(log_path)[:3]), encoding="utf-8")
    assert verify(log_path).ok  # the chain alone cannot tell
    result = verify(log_path, anchor=anchor)
    assert not result.ok
    assert "removed" in str(result.problem)
    # New records chained onto the cut log do not pass either.
    with AuditLog(log_path) as log:
        for n in range(3):
            log.record(EVENT_LOGIN, "user0", n=n)
    assert not verify(log_path, anchor=anchor).ok
    assert verify(log_path, anchor=Anchor(2, json.loads(lines(log_path)[1])["hash"])).ok


def test_anchor_forms_parse(log_path: Path) -> None:
    write_records(log_path, 2)
    digest = verify(log_path).last_hash
    assert parse_anchor(digest) == digest
    assert parse_anchor(json.dumps({"count": 2, "last_hash": digest})) == Anchor(2, digest)
    journal = f"Nov 30 appliance-audit[12]: audit anchor count=1 last_hash={'a' * 64}\n"
    journal += f"Nov 30 appliance-audit[12]: {Anchor(2, digest).line()}\n"
    assert parse_anchor(journal) == Anchor(2, digest)
    with pytest.raises(AuditError, match="not an audit anchor"):
        parse_anchor("yesterday's log")


def test_anchors_are_reported_every_n_records_and_at_close(log_path: Path) -> None:
    seen: list[Anchor] = []
    with AuditLog(log_path, anchor_every=2, on_anchor=seen.append) as log:
        records = [log.record(EVENT_LOGIN, "user0", n=n) for n in range(5)]
    assert [a.count for a in seen] == [2, 4, 5]
    assert seen[-1].last_hash == records[-1]["hash"]


def test_a_keyed_chain_cannot_be_rewritten_without_the_key(log_path: Path) -> None:
    key = b"k" * 32
    with AuditLog(log_path, key=key) as log:
        for n in range(3):
            log.record(EVENT_LOGIN, "user0", n=n)
    assert verify(log_path, key=key).ok
    assert verify(log_path, key=key).keyed_from == 1
    # Someone who can write the data folder edits record 2 and re-hashes the chain from there.
    records = [json.loads(line) for line in lines(log_path)]
    records[1]["data"]["n"] = 99
    prev = records[0]["hash"]
    for record in records[1:]:
        record["prev"] = prev
        record.pop("mac")
        record["hash"] = record_hash(record)
        prev = record["hash"]
    log_path.write_text("".join(canonical(r) + "\n" for r in records), encoding="utf-8")
    assert verify(log_path).ok  # an unkeyed check is fooled
    result = verify(log_path, key=key)
    assert not result.ok
    assert "no MAC" in str(result.problem)


def test_wrong_key_is_refused(log_path: Path) -> None:
    with AuditLog(log_path, key=b"k" * 32) as log:
        log.record(EVENT_LOGIN, "user0")
    result = verify(log_path, key=b"z" * 32)
    assert not result.ok
    assert "wrong MAC" in str(result.problem)


def test_key_file_must_be_outside_the_data_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    inside = data / "audit.key"
    inside.write_bytes(b"k" * 48)
    with pytest.raises(AuditError, match="inside the data folder"):
        load_key(inside, data)
    short = tmp_path / "short.key"
    short.write_bytes(b"k" * 8)
    with pytest.raises(AuditError, match="at least 32"):
        load_key(short, data)
    good = tmp_path / "audit.key"
    good.write_bytes(b"k" * 48 + b"\n")
    assert load_key(good, data) == b"k" * 48


@pytest.mark.parametrize("user", ["evil\nname", "\x1b[2Jadmin", "a" * 65, "a b", "bob:x"])
def test_user_field_takes_only_valid_names(log_path: Path, user: str) -> None:
    with AuditLog(log_path) as log, pytest.raises(AuditError, match="invalid audit user"):
        log.record(EVENT_LOGIN, user)
    with AuditLog(log_path) as log:
        assert log.record(EVENT_LOGIN, None, attempt=user)["data"]["attempt"] == user
        assert log.record(EVENT_LOGIN, "local:root")["user"] == "local:root"


def test_printable_escapes_control_and_format_characters() -> None:
    assert printable("ok\nforged line") == "ok\\u000aforged line"
    assert printable("\x1b[31mred") == "\\u001b[31mred"
    assert printable("abc\u202edef") == "abc\\u202edef"
    assert printable("Zoë 52,857") == "Zoë 52,857"
