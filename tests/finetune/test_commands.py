"""`appliance finetune` without training: arguments, errors, run folders, listing, stopping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.cli import build_parser, main
from appliance.core.settings import load_settings
from finetune import runs


def test_the_run_config_does_not_shadow_the_settings_file() -> None:
    args = build_parser().parse_args(
        ["--config", "settings.yaml", "finetune", "--dataset", "d", "--config", "run.yaml"]
    )
    assert args.config == Path("settings.yaml")
    assert args.run_config == Path("run.yaml")
    assert args.action == "run"


def test_errors_name_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    assert main([*data, "finetune"]) == 1
    assert "--dataset" in capsys.readouterr().err
    assert main([*data, "finetune", "--dataset", "nowhere"]) == 1
    assert "appliance dataset build" in capsys.readouterr().err
    assert main([*data, "finetune", "resume"]) == 1
    assert "RUN" in capsys.readouterr().err
    assert main([*data, "finetune", "stop", "../etc"]) == 1
    assert "not a run id" in capsys.readouterr().err
    assert main([*data, "finetune", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_a_queued_run_is_listed_and_can_be_asked_to_stop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = load_settings(overrides={"data_dir": str(tmp_path / "data")})
    dataset = tmp_path / "pairs.jsonl"
    records = [
        {
            "messages": [
                {"role": "user", "content": f"Question number {i} about topic {i * 7}?"},
                {"role": "assistant", "content": f"Answer {i}."},
            ]
        }
        for i in range(4)
    ]
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records))
    from finetune.dataset import build_dataset

    info = build_dataset(settings, [str(dataset)], "tiny")
    folder = runs.create_run(settings, "tiny", overrides={"max_steps": 3}, requested_by="alice")
    request = json.loads((folder / "request.json").read_text())
    assert request["dataset_sha256"] == info.sha256
    assert request["config"]["max_steps"] == 3
    listed = runs.list_runs(settings)
    assert [(r["run"], r["status"], r["requested_by"]) for r in listed] == [
        (folder.name, "queued", "alice")
    ]
    data = ["--data-dir", str(settings.data_dir)]
    assert main([*data, "finetune", "stop", folder.name]) == 0
    assert (folder / "stop").exists()
    capsys.readouterr()


def test_a_jsonl_file_is_built_into_a_dataset_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI path of ``--dataset FILE``: the dataset and the run are made, then the run stops
    at the base model (absent here on purpose: training is tested elsewhere, end to end in
    test_end_to_end.py with a file as well)."""
    pairs = tmp_path / "sig.jsonl"
    records = [
        {"instruction": f"Which form is number {i}?", "response": f"Form F-{i}."} for i in range(6)
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records))
    missing = tmp_path / "no-such-base.gguf"
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(f"finetune:\n  base_model_path: {missing}\n")
    args = ["--config", str(settings_file), "--data-dir", str(tmp_path / "data"), "finetune"]
    assert main([*args, "--dataset", str(pairs), "--max-steps", "1"]) == 1
    err = capsys.readouterr().err
    assert f"built dataset 'sig' from {pairs}" in err
    assert "no-such-base.gguf" in err  # then the run failed where it should
    settings = load_settings(overrides={"data_dir": str(tmp_path / "data")})
    [run] = runs.list_runs(settings)
    assert run["dataset"] == str(settings.datasets_dir / "sig")
    assert run["status"] == "failed"

    assert main([*args, "--dataset", str(pairs)]) == 1
    assert "dataset 'sig' already holds exactly what sig.jsonl builds" in capsys.readouterr().err
    pairs.write_text(json.dumps(records[0]) + "\n" + json.dumps(records[1]) + "\n")
    assert main([*args, "--dataset", str(pairs)]) == 1
    assert "'sig' exists with other content, so the new one is 'sig-2'" in (capsys.readouterr().err)
    assert main([*args, "--dataset", str(tmp_path / "absent.jsonl")]) == 1
    assert "appliance dataset build" in capsys.readouterr().err  # not a file: a name, unknown


def test_a_run_gives_back_the_signal_handlers_it_took(tmp_path: Path) -> None:
    """A run started in a longer-lived process (this test session) must not leave its
    SIGTERM/SIGINT handlers behind: a forked child would ignore SIGTERM, Ctrl-C would set a
    finished run's event."""
    import signal

    from appliance.commands.finetune import _stop_event

    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    with _stop_event(tmp_path) as stop:
        assert signal.getsignal(signal.SIGTERM) not in before
        signal.raise_signal(signal.SIGTERM)
        assert stop.is_set()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
