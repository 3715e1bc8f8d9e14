"""The model registry and ``appliance models``: base registration, lineage, activation and
rollback, hash checks, concurrent writers, and the audit trail of the CLI."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any

import pytest

from appliance.cli import main
from appliance.core import hashing
from appliance.core.audit import read as read_audit
from appliance.core.errors import ModelError
from appliance.core.settings import load_settings
from finetune.registry import ModelRegistry, cached_sha256


def fake_gguf(path: Path, payload: bytes = b"weights") -> Path:
    """The registry only hashes files; it never parses them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + payload)
    return path


def record(tmp: Path, name: str, *, passed: bool | None = True) -> dict[str, Any]:
    gguf = fake_gguf(tmp / name / "model-Q4_K_M.gguf", name.encode())
    return {
        "run_id": f"run-{name}",
        "dataset_sha256": "d" * 64,
        "config": {"lora_r": 16, "steps": 60},
        "adapter": {"path": str(tmp / name / "adapter"), "sha256": {"adapter.safetensors": "a"}},
        "merged_model": str(tmp / name / "merged"),
        "gguf": {"path": str(gguf)},
        "f16_gguf": {"path": str(tmp / name / "model-f16.gguf"), "sha256": "f" * 64},
        "lora_gguf": None,
        "gate": None
        if passed is None
        else {
            "passed": passed,
            "metrics": {"base": {"accuracy": 0.5}, "candidate": {"accuracy": 0.6}},
            "report": str(tmp / name / "gate.json"),
        },
        "notes": "",
    }


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    reg = ModelRegistry(tmp_path / "models")
    reg.ensure_base(fake_gguf(tmp_path / "base.Q4_1.gguf", b"base"))
    return reg


def test_base_is_registered_once_and_active(registry: ModelRegistry, tmp_path: Path) -> None:
    base = registry.active()
    assert base["version"] == "base"
    assert base["gguf"]["sha256"] == hashing.file_sha256(tmp_path / "base.Q4_1.gguf")
    assert base["gguf"]["quantization"] == "Q4_1"
    again = registry.ensure_base(tmp_path / "base.Q4_1.gguf")
    assert again["gguf"]["sha256"] == base["gguf"]["sha256"]
    assert len(registry.versions()) == 1
    with pytest.raises(ModelError, match="registered base"):
        registry.ensure_base(fake_gguf(tmp_path / "other.gguf", b"other"))


def test_register_activate_and_roll_back(registry: ModelRegistry, tmp_path: Path) -> None:
    v1 = registry.register(record(tmp_path, "a"))
    v2 = registry.register(record(tmp_path, "b"))
    assert (v1, v2) == ("v1", "v2")
    assert registry.active_version() == "base", "registering does not activate"
    got = registry.get("v1")
    assert got["parent"] == "base"
    assert got["run_id"] == "run-a"
    assert got["gguf"]["sha256"] == hashing.file_sha256(Path(got["gguf"]["path"]))
    assert got["gguf"]["quantization"] == "Q4_K_M"

    registry.activate("v1", by="tester")
    registry.activate("v2")
    assert registry.active()["version"] == "v2"
    assert registry.rollback() == "v1"
    assert registry.rollback() == "base", "rollbacks keep going back"
    with pytest.raises(ModelError, match="nothing to roll back"):
        registry.rollback()
    history = registry.history()
    assert [h["version"] for h in history] == ["base", "v1", "v2", "v1", "base"]
    assert history[1]["by"] == "tester"
    assert history[3]["rollback_from"] == "v2"
    with pytest.raises(ModelError, match="no model version 'v9'; registered: base, v1, v2"):
        registry.activate("v9")


def test_versions_list_fields(registry: ModelRegistry, tmp_path: Path) -> None:
    registry.register(record(tmp_path, "a"))
    registry.activate("v1")
    listed = registry.versions()
    assert [v["version"] for v in listed] == ["base", "v1"]
    assert [v["active"] for v in listed] == [False, True]
    assert listed[1]["gguf"] == str((tmp_path / "a" / "model-Q4_K_M.gguf").resolve())
    assert listed[1]["metrics"]["candidate"]["accuracy"] == 0.6
    assert listed[1]["gate_passed"] is True
    assert listed[0]["metrics"] is None
    json.dumps(listed)  # JSON-clean


def test_tampered_gguf_is_refused(registry: ModelRegistry, tmp_path: Path) -> None:
    registry.register(record(tmp_path, "a"))
    path = registry.verified_gguf("v1")
    with path.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match="trusted only by hash"):
        registry.verified_gguf("v1")
    with pytest.raises(ModelError, match="has changed"):
        registry.activate("v1")
    path.unlink()
    with pytest.raises(ModelError, match="is missing"):
        registry.activate("v1", force=True)
    assert registry.active_version() == "base"


def test_hash_is_cached_by_size_and_mtime(
    registry: ModelRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.register(record(tmp_path, "a"))
    calls: list[Path] = []
    real = hashing.file_sha256

    def counting(path: Path) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(hashing, "file_sha256", counting)
    for _ in range(3):
        registry.verified_gguf("v1")
    assert calls == [], "unchanged files are not hashed again"
    gguf = Path(registry.get("v1")["gguf"]["path"])
    gguf.write_bytes(gguf.read_bytes() + b"x")
    with pytest.raises(ModelError):
        registry.verified_gguf("v1")
    assert len(calls) == 1
    assert cached_sha256(gguf) == real(gguf)


def test_failed_gate_needs_force(registry: ModelRegistry, tmp_path: Path) -> None:
    registry.register(record(tmp_path, "bad", passed=False))
    with pytest.raises(ModelError, match=r"failed its gate .*--force"):
        registry.activate("v1")
    assert registry.active_version() == "base"
    registry.activate("v1", force=True)
    assert registry.history()[-1]["forced"] is True


def test_stamp_notices_another_writer(registry: ModelRegistry, tmp_path: Path) -> None:
    other = ModelRegistry(registry.models_dir)
    token = registry.stamp()
    assert not registry.changed_since(token)
    other.register(record(tmp_path, "a"))
    assert registry.changed_since(token)
    token = registry.stamp()
    other.activate("v1")
    assert registry.changed_since(token)
    assert registry.active_version() == "v1"
    assert ModelRegistry(tmp_path / "empty").stamp() == 0


def _register_many(args: tuple[str, str, int]) -> list[str]:
    models_dir, tmp, n = args
    reg = ModelRegistry(Path(models_dir))
    return [reg.register(record(Path(tmp), f"{Path(tmp).name}-{i}")) for i in range(n)]


def test_concurrent_writers_lose_nothing(registry: ModelRegistry, tmp_path: Path) -> None:
    """Two processes, each with its own registry on one folder, register at the same time."""
    jobs = [(str(registry.models_dir), str(tmp_path / f"p{k}"), 8) for k in range(2)]
    # spawned, not forked: a fork copies whatever this test process holds (signal handlers,
    # threads of models other tests opened, their locks)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_register_many, jobs)
    ids = [v for r in results for v in r]
    assert sorted(ids, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(1, 17)]
    assert len(registry.versions()) == 17
    assert not list(registry.models_dir.glob(".registry-*")), "no temporary file is left"


def test_corrupt_registry_is_a_clear_error(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    (tmp_path / "registry.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        reg.versions()


# --- the CLI ---------------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_commands(capsys: pytest.CaptureFixture[str], hermetic_env: Path) -> None:
    settings = load_settings()
    code, out, err = run(capsys, "models", "list", "--json")
    assert code == 0, err
    listed = json.loads(out)
    assert [(v["version"], v["active"]) for v in listed] == [("base", True)]
    assert listed[0]["gguf"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "metrics" in listed[0]

    reg = ModelRegistry(settings.models_dir)
    reg.register(record(hermetic_env / "runs", "good"))
    reg.register(record(hermetic_env / "runs", "bad", passed=False))

    assert run(capsys, "models", "activate", "v1")[0] == 0
    code, out, err = run(capsys, "models", "activate", "v2")
    assert code == 1
    assert "failed its gate" in err
    assert run(capsys, "models", "activate", "v2", "--force")[0] == 0
    code, out, _ = run(capsys, "models", "list")
    assert "* v2" in out
    code, out, _ = run(capsys, "models", "rollback")
    assert code == 0
    assert "from v2 to v1" in out
    assert json.loads(run(capsys, "models", "list", "--json")[1])[1]["active"] is True

    events = [r for r in read_audit(settings.audit_path) if r["event"] == "admin"]
    actions = [(r["data"]["action"], r["data"]["target"]) for r in events]
    assert actions == [("model_activate", "v1"), ("model_activate", "v2"), ("model_rollback", "v1")]
    assert events[1]["data"]["forced"] is True
    assert events[1]["data"]["previous"] == "v1"
