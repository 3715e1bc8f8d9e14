"""The loss curve of a run as a PNG (matplotlib's Agg backend: no display, no GUI toolkit)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from appliance.core.errors import missing_dependency


def read_loss_log(path: Path) -> list[dict[str, float]]:
    """The records of ``loss.jsonl``; a torn last line (a killed run) is ignored."""
    records: list[dict[str, float]] = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_loss(loss_jsonl: Path, out_png: Path, *, title: str = "training loss") -> Path:
    """Draw loss (and the learning rate on a second axis) against the step; returns the PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise missing_dependency("matplotlib") from exc

    records = read_loss_log(loss_jsonl)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        for phase, color in (("sft", "tab:blue"), ("dpo", "tab:red")):
            points = [r for r in records if r.get("phase", "sft") == phase]
            if points:
                ax.plot(
                    [r["step"] for r in points],
                    [r["loss"] for r in points],
                    color=color,
                    marker="." if len(points) < 50 else None,
                    label=f"{phase} loss",
                )
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        sft = [r for r in records if r.get("phase", "sft") == "sft" and "lr" in r]
        if sft:
            lr_ax = ax.twinx()
            lr_ax.plot(
                [r["step"] for r in sft],
                [r["lr"] for r in sft],
                color="tab:gray",
                linestyle="--",
                linewidth=1,
                label="learning rate",
            )
            lr_ax.set_ylabel("learning rate")
        if records:
            ax.legend(loc="upper right")
        fig.tight_layout()
        # Written beside and renamed so a UI never shows a half-written image.
        tmp = out_png.with_name(f".{out_png.name}.tmp")
        fig.savefig(tmp, format="png")
        os.replace(tmp, out_png)
    finally:
        plt.close(fig)
    return out_png
