"""The whole adaptation loop on the CPU, with the default model, inside a network namespace.

One chain of real commands, as an admin would run them, in a namespace that has no network at
all (only loopback): ingest a folder, ask, eval, build a dataset from an instruction file,
fine-tune on the same instruction file (``--dataset FILE``: the dataset is built again under the
file's name; the precision is measured; gate, merge, GGUF, quantize, register, activate), list
the models. The dataset teaches SmolLM2-135M a format it never uses on its own: every answer
ends with a line ``Source: <file>``. Afterwards the base GGUF and the activated GGUF answer
unseen questions (other facts, other file names) in llama.cpp, and the fine-tuned one must
follow the format far more often.

Where ``unshare -n`` is not permitted the chain still runs (without the namespace) and only the
offline-proof test skips, saying why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.finetune.format_data import RUN_CONFIG, adherence, make_format_records

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

DOCS = {
    "policy.md": "# Records policy\n\nAudit logs are kept for seven years under policy AP-12. "
    "Backup tapes are rotated every month and stored off site.\n",
    "hr/leave.md": "# Leave\n\nAnnual leave requests are approved by the line manager. Staff "
    "get 25 days of leave a year.\n",
    "it.md": "# IT\n\nPasswords are changed every 90 days. Laptops are encrypted with full-disk "
    "encryption before they are issued.\n",
}
GOLDEN = [
    {"id": "g1", "question": "How long are audit logs kept?", "answer": "Seven years.",
     "evidence_doc": ["policy.md"]},
    {"id": "g2", "question": "Who approves annual leave?", "answer": "The line manager.",
     "evidence_doc": ["leave.md"]},
]  # fmt: skip

SCRIPT = """\
set -eu
ip link set lo up 2>/dev/null || true
ip -o link show > links.txt
A() { "$PY" -m appliance.cli --data-dir "$DATA" "$@"; }
A ingest docs --json > ingest.json
A ask "How long are audit logs kept?" --json > ask.json
A eval golden.jsonl --json > eval.json
A dataset build --from pairs.jsonl --out format --json > dataset.json
A finetune --dataset pairs.jsonl --config run.yaml --json > finetune.json
A models list --json > models.json
"""


def _netns_available() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("e2e")
    for name, text in DOCS.items():
        (work / "docs" / name).parent.mkdir(parents=True, exist_ok=True)
        (work / "docs" / name).write_text(text, encoding="utf-8")
    (work / "golden.jsonl").write_text(
        "".join(json.dumps(g) + "\n" for g in GOLDEN), encoding="utf-8"
    )
    records = make_format_records(36, seed=1)
    (work / "pairs.jsonl").write_text(
        "".join(json.dumps({"messages": r["messages"]}) + "\n" for r in records),
        encoding="utf-8",
    )
    (work / "run.yaml").write_text(RUN_CONFIG, encoding="utf-8")
    netns = _netns_available()
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env |= {"PY": sys.executable, "DATA": str(work / "data"), "PYTHONPATH": str(ROOT)}
    command = ["unshare", "-n", "sh", "-c", SCRIPT] if netns else ["sh", "-c", SCRIPT]
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"the chain failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return {"work": work, "netns": netns, "stderr": done.stderr}


def test_the_chain_runs_inside_a_namespace_without_network(chain: dict[str, Any]) -> None:
    if not chain["netns"]:
        pytest.skip("`unshare -n` is not permitted here (needs root or user namespaces)")
    links = (chain["work"] / "links.txt").read_text()
    names = [line.split(":")[1].strip() for line in links.splitlines() if ":" in line]
    assert names == ["lo"], f"the namespace has more than loopback: {links}"


def test_every_stage_did_its_work(chain: dict[str, Any]) -> None:
    work = chain["work"]
    assert _read(work / "ingest.json")["added"] == len(DOCS)
    ask = _read(work / "ask.json")
    assert ask["sources"][0]["path"] == "policy.md"
    assert _read(work / "eval.json")["metrics"]["recall_at_k"] == 1.0
    dataset = _read(work / "dataset.json")
    assert dataset["train"] + dataset["heldout"] == 36
    final = _read(work / "finetune.json")
    # `finetune --dataset FILE` built the same dataset `dataset build --from FILE` did.
    built = final["dataset_built"]
    assert (built["name"], built["action"], built["sha256"]) == (
        "pairs",
        "built",
        dataset["sha256"],
    )
    assert final["status"] == "activated", final
    # The default precision is measured, and the choice is in the command's JSON.
    precision = final["precision"]
    assert precision["requested"] == "auto"
    assert precision["chosen"] in [c["name"] for c in precision["candidates"]]
    models = _read(work / "models.json")
    active = [m for m in models if m["active"]]
    assert [m["version"] for m in active] == [final["version"]]
    assert {m["version"] for m in models} >= {"base", final["version"]}
    run = work / "data" / "finetune" / "runs" / final["run"]
    for produced in ("loss.png", "config.json", "gate/gate.json", "gate/gate.html"):
        assert (run / produced).is_file(), produced
    assert list((run / "adapter").glob("*.safetensors"))
    assert not list((run / "adapter").glob("*.bin"))


def test_fine_tuning_teaches_the_format(chain: dict[str, Any]) -> None:
    """Format adherence on unseen questions: base against the activated model, in llama.cpp."""
    from appliance.chat.llamacpp import LlamaCppChatModel
    from appliance.core.protocols import GenerationParams

    models = _read(chain["work"] / "models.json")
    base = next(Path(m["gguf"]) for m in models if m["version"] == "base")
    tuned = next(Path(m["gguf"]) for m in models if m["active"])
    unseen = make_format_records(16, seed=12345)
    params = GenerationParams(max_tokens=80, temperature=0.0, seed=0)
    rates = {}
    for name, path in (("base", base), ("tuned", tuned)):
        with LlamaCppChatModel(path, n_ctx=1024, n_threads=2, seed=0) as model:
            hits = [
                adherence(model.complete(r["messages"][:-1], params)[0], r["file"]) for r in unseen
            ]
        rates[name] = sum(hits) / len(hits)
    print(f"format adherence on {len(unseen)} unseen questions: {rates}")
    assert rates["base"] <= 0.25
    assert rates["tuned"] >= 0.75
    assert rates["tuned"] - rates["base"] >= 0.5
