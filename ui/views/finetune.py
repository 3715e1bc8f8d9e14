"""Admin / Fine-tuning: runs with their progress, loss curves and gate reports; start or stop."""

from __future__ import annotations

import time
from typing import Any

import streamlit as st

from appliance.api import ServiceClient, ServiceError
from appliance.core.audience import describe
from ui import session
from ui.safe import md

_ACTIVE = ("queued", "training", "exporting", "gating")


def _when(seconds: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds)) if seconds else ""


def _start_form(api: ServiceClient, datasets: list[dict[str, Any]]) -> None:
    names = [str(d.get("name")) for d in datasets if d.get("name")]
    with st.form("finetune-start"):
        st.subheader("Start a run")
        if not names:
            st.caption(
                "No datasets yet. Build one on the appliance: "
                "`appliance dataset build --from feedback --from docs`."
            )
        dataset = st.selectbox("Dataset", names, disabled=not names)
        steps = st.number_input("Training steps", min_value=1, max_value=100_000, value=120)
        if st.form_submit_button("Start fine-tuning", disabled=not names):
            reply = session.call(
                api, "POST", "/admin/finetune/start", {"dataset": dataset, "max_steps": steps}
            )
            session.flash(f"Run {reply['run']} started ({reply['started']}).")
            st.rerun()


def _precision(record: dict[str, Any] | None) -> None:
    """How the run's precision was chosen: the measured step time of each candidate."""
    if not record:
        return
    chosen, reason = md(str(record.get("chosen"))), md(str(record.get("reason") or ""))
    st.write(f"Precision: **{chosen}** ({reason})")
    rows = [
        {
            "Candidate": c.get("name"),
            "Step (s)": c.get("step_s"),
            "Warm-up (s)": c.get("warmup_s"),
            "Load (s)": c.get("load_s"),
            "Memory estimate (MiB)": c.get("need_mb"),
            "Note": c.get("error") or c.get("skipped") or "",
        }
        for c in record.get("candidates") or []
    ]
    if rows:
        st.dataframe(rows, hide_index=True, width="stretch")


def _run_details(api: ServiceClient, run: dict[str, Any]) -> None:
    st.write(
        md(
            f"Dataset {run.get('dataset') or ''} · requested by {run.get('requested_by') or ''}"
            f" · {_when(run.get('created'))} · trained on {describe(run.get('audience'))}"
        )
    )
    if run.get("error"):
        st.error(md(str(run["error"])))
    if run.get("max_steps"):
        done = min(1.0, (run.get("step") or 0) / max(1, run["max_steps"]))
        loss = run.get("loss")
        label = f"step {run.get('step')}/{run['max_steps']}"
        st.progress(done, text=label + (f", loss {loss:.3f}" if loss is not None else ""))
    _precision(run.get("precision"))
    if run.get("loss_curve"):
        try:
            _name, _type, png = api.download(
                "/admin/finetune/file", {"run": run["run"], "kind": "loss"}
            )
            st.image(png, caption="Training loss")
        except ServiceError as exc:
            st.caption(md(f"Loss curve unavailable: {exc}"))
    gate = run.get("gate") or {}
    if gate:
        if gate.get("passed"):
            st.success(f"Gate passed against {gate.get('reference')}.")
        else:
            st.warning(md("Gate rejected: " + "; ".join(gate.get("failures") or [])))
        rows = []
        for name, sides in (gate.get("metrics") or {}).items():
            for metric, value in (sides.get("reference") or {}).items():
                rows.append(
                    {
                        "Set": name,
                        "Metric": metric,
                        "Serving model": value,
                        "Candidate": (sides.get("candidate") or {}).get(metric),
                    }
                )
        if rows:
            st.dataframe(rows, hide_index=True, width="stretch")
    if run.get("gate_report"):
        try:
            name, kind, page = api.download(
                "/admin/finetune/file", {"run": run["run"], "kind": "gate"}
            )
            # A download, not an embedded frame: the report holds model output, kept inert.
            st.download_button(
                "Gate report (every question, HTML)",
                page,
                file_name=f"{run['run']}-{name}",
                mime=kind,
                key=f"gate-{run['run']}",
            )
        except ServiceError as exc:
            st.caption(md(f"Gate report unavailable: {exc}"))
    if run.get("status") in _ACTIVE and st.button("Stop this run", key=f"stop-{run['run']}"):
        session.call(api, "POST", "/admin/finetune/stop", {"run": run["run"]})
        session.flash(f"Run {run['run']} will stop after its current step.")
        st.rerun()


def render(api: ServiceClient) -> None:
    st.title("Fine-tuning")
    session.show_flash()
    info: dict[str, Any] = session.call(api, "GET", "/admin/finetune/runs")
    runs: list[dict[str, Any]] = info.get("runs") or []
    _start_form(api, info.get("datasets") or [])
    st.subheader("Runs")
    if not runs:
        st.caption("No fine-tuning runs yet.")
    for run in runs:
        title = f"{run['run']} · {run.get('status')}" + (
            f" · {run['version']}" if run.get("version") else ""
        )
        with st.expander(title, expanded=run is runs[0]):
            _run_details(api, run)
    if any(r.get("status") in _ACTIVE for r in runs) and st.button("Refresh"):
        st.rerun()


if __name__ == "__main__":
    render(session.api())
