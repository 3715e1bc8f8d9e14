"""The audit log over real files: chaining, tamper detection, concurrent writers, filters."""

from __future__ import annotations

import json
import multiprocessing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from appliance.audit import (
    EVENT_ADMIN,
    EVENT_LOGIN,
    EVENT_QUESTION,
    GENESIS,
    AuditError,
    AuditLog,
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
