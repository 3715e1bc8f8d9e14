"""The Prometheus metrics: values parsed back from the exposition text, a real ``/metrics``
server on a free loopback port, and the Grafana dashboard checked against the metric names."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.parser import text_string_to_metric_families

from appliance.core.errors import ConfigError, ServiceError
from appliance.metrics import Metrics, MetricsServer

DASHBOARD = Path(__file__).resolve().parents[2] / "ops" / "grafana-dashboard.json"
SUFFIXES = ("_bucket", "_sum", "_count", "_created")


def samples(text: bytes | str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition text, keyed by name and label set."""
    if isinstance(text, bytes):
        text = text.decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics.render()).get((name, frozenset(labels.items())))


def fetch(port: int, path: str) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def server(metrics: Metrics) -> Iterator[MetricsServer]:
    with MetricsServer(metrics, port=0) as srv:
        yield srv


def test_fresh_metrics_start_at_zero(metrics: Metrics) -> None:
    assert value(metrics, "appliance_questions_total") == 0
    assert value(metrics, "appliance_feedback_total", rating="up") == 0
    assert value(metrics, "appliance_logins_total", result="failure") == 0
    assert value(metrics, "appliance_ingest_last_success_timestamp_seconds") == 0
    assert value(metrics, "appliance_time_to_first_token_seconds_count") == 0
    assert Metrics.CONTENT_TYPE == CONTENT_TYPE_PLAIN_0_0_4


def test_instances_do_not_share_a_registry() -> None:
    first, second = Metrics(), Metrics()
    first.feedback("up")
    assert value(first, "appliance_feedback_total", rating="up") == 1
    assert value(second, "appliance_feedback_total", rating="up") == 0


def test_observe_answer_counts_and_times(metrics: Metrics) -> None:
    metrics.observe_answer(
        {
            "abstained": False,
            "timings": {
                "retrieval_s": 0.04,
                "ttft_s": 1.5,
                "total_s": 6.04,
                "completion_tokens": 120,
                "tokens_per_s": 24.0,
            },
        }
    )
    # An early abstention: no model call, so no time to first token or generation.
    metrics.observe_answer({"abstained": True, "timings": {"retrieval_s": 0.02, "total_s": 0.02}})
    got = samples(metrics.render())

    def at(name: str, **labels: str) -> float:
        return got[(name, frozenset(labels.items()))]

    assert at("appliance_questions_total") == 2
    assert at("appliance_abstentions_total") == 1
    assert at("appliance_generated_tokens_total") == 120
    assert at("appliance_retrieval_seconds_count") == 2
    assert at("appliance_retrieval_seconds_sum") == pytest.approx(0.06)
    assert at("appliance_retrieval_seconds_bucket", le="0.025") == 1
    assert at("appliance_retrieval_seconds_bucket", le="0.05") == 2
    assert at("appliance_time_to_first_token_seconds_count") == 1
    assert at("appliance_time_to_first_token_seconds_bucket", le="1.0") == 0
    assert at("appliance_time_to_first_token_seconds_bucket", le="2.5") == 1
    assert at("appliance_generation_seconds_count") == 1
    assert at("appliance_generation_seconds_sum") == pytest.approx(6.0)
    assert at("appliance_generation_seconds_bucket", le="120.0") == 1


@pytest.mark.parametrize(
    "answer",
    [
        {},
        {"abstained": False},
        {"timings": None},
        {"timings": {"retrieval_s": None, "ttft_s": "soon", "total_s": float("nan")}},
        {"timings": {"retrieval_s": -1, "completion_tokens": True}},
    ],
)
def test_observe_answer_tolerates_missing_and_odd_timings(
    metrics: Metrics, answer: dict[str, Any]
) -> None:
    metrics.observe_answer(answer)
    assert value(metrics, "appliance_questions_total") == 1
    assert value(metrics, "appliance_abstentions_total") == 0
    assert value(metrics, "appliance_retrieval_seconds_count") == 0
    assert value(metrics, "appliance_time_to_first_token_seconds_count") == 0
    assert value(metrics, "appliance_generated_tokens_total") == 0


def test_errors_feedback_and_logins(metrics: Metrics) -> None:
    metrics.answer_error("ModelError")
    metrics.answer_error("ModelError")
    metrics.feedback("up")
    metrics.feedback("down")
    metrics.feedback("down")
    metrics.login(True)
    metrics.login(False)
    metrics.login(False)
    metrics.http_request("/ask", 200)
    assert value(metrics, "appliance_answer_errors_total", kind="ModelError") == 2
    assert value(metrics, "appliance_feedback_total", rating="up") == 1
    assert value(metrics, "appliance_feedback_total", rating="down") == 2
    assert value(metrics, "appliance_logins_total", result="success") == 1
    assert value(metrics, "appliance_logins_total", result="failure") == 2
    assert value(metrics, "appliance_http_requests_total", route="/ask", status="200") == 1


def test_feedback_rejects_an_unknown_rating(metrics: Metrics) -> None:
    with pytest.raises(ValueError, match="'meh'"):
        metrics.feedback("meh")


def test_set_ingest_sets_the_gauges(metrics: Metrics) -> None:
    metrics.set_ingest(
        {
            "documents": 12,
            "chunks": 3400,
            "failed": [{"path": "a.pdf", "reason": "encrypted"}],
            "in_progress": ["b.docx", "c.html"],
        },
        last_success=1_700_000_000.5,
    )
    metrics.ingest_failure()
    metrics.ingest_failure(2)
    assert value(metrics, "appliance_documents_indexed") == 12
    assert value(metrics, "appliance_chunks_indexed") == 3400
    assert value(metrics, "appliance_ingest_failed_documents") == 1
    assert value(metrics, "appliance_ingest_queue_depth") == 2
    assert value(metrics, "appliance_ingest_last_success_timestamp_seconds") == 1_700_000_000.5
    assert value(metrics, "appliance_ingest_failures_total") == 3

    # A partial status leaves the other gauges, and the last success, as they were.
    metrics.set_ingest({"in_progress": []})
    assert value(metrics, "appliance_ingest_queue_depth") == 0
    assert value(metrics, "appliance_documents_indexed") == 12
    assert value(metrics, "appliance_ingest_last_success_timestamp_seconds") == 1_700_000_000.5


def test_set_model_replaces_the_previous_label_set(metrics: Metrics) -> None:
    def models() -> set[frozenset[tuple[str, str]]]:
        return {
            labels
            for (name, labels), v in samples(metrics.render()).items()
            if name == "appliance_active_model_info" and v == 1
        }

    assert models() == set()
    metrics.set_model("qwen2.5-3b", "base", "packaged")
    assert models() == {
        frozenset({"model": "qwen2.5-3b", "version": "base", "origin": "packaged"}.items())
    }
    metrics.set_model("qwen2.5-3b", "ft-0003", "finetune")
    assert models() == {
        frozenset({"model": "qwen2.5-3b", "version": "ft-0003", "origin": "finetune"}.items())
    }


def test_collect_callback_refreshes_gauges_on_each_scrape() -> None:
    status = {"documents": 1}
    live = Metrics(collect=lambda: live.set_ingest(status))
    assert value(live, "appliance_documents_indexed") == 1
    status["documents"] = 5
    assert value(live, "appliance_documents_indexed") == 5


def test_a_failing_collect_callback_keeps_the_scrape_alive(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = False

    def refresh() -> None:
        if broken:
            raise RuntimeError("the ingestion state is locked")
        live.set_ingest({"documents": 7})

    live = Metrics(collect=refresh)
    assert value(live, "appliance_documents_indexed") == 7
    assert value(live, "appliance_metrics_collect_errors_total") == 0
    broken = True
    with caplog.at_level("WARNING", logger="appliance.metrics"):
        got = samples(live.render())
    assert got[("appliance_documents_indexed", frozenset())] == 7
    assert got[("appliance_metrics_collect_errors_total", frozenset())] == 1
    assert "refresh callback failed" in caplog.text


def test_server_serves_metrics_and_404s_elsewhere(metrics: Metrics, server: MetricsServer) -> None:
    assert server.port > 0
    metrics.observe_answer({"abstained": True, "timings": {"retrieval_s": 0.01}})
    metrics.feedback("up")
    status, content_type, body = fetch(server.port, "/metrics")
    assert status == 200
    assert content_type == Metrics.CONTENT_TYPE
    got = samples(body)
    assert got[("appliance_questions_total", frozenset())] == 1
    assert got[("appliance_abstentions_total", frozenset())] == 1
    assert got[("appliance_feedback_total", frozenset({("rating", "up")}))] == 1

    metrics.login(False)
    _, _, body = fetch(server.port, "/metrics?x=1")
    assert samples(body)[("appliance_logins_total", frozenset({("result", "failure")}))] == 1

    assert fetch(server.port, "/")[0] == 404
    assert fetch(server.port, "/metrics/extra")[0] == 404


def test_server_reports_a_taken_port(metrics: Metrics, server: MetricsServer) -> None:
    with pytest.raises(ServiceError, match=f"127.0.0.1:{server.port}"):
        MetricsServer(metrics, port=server.port).start()


def test_server_stop_is_idempotent_and_frees_the_port(metrics: Metrics) -> None:
    srv = MetricsServer(metrics, port=0)
    srv.stop()  # before start: nothing to do
    srv.start()
    port = srv.port
    srv.stop()
    srv.stop()
    with MetricsServer(metrics, port=port) as again:
        assert fetch(again.port, "/metrics")[0] == 200


def test_missing_prometheus_client_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ConfigError, match="pip install prometheus-client"):
        Metrics()


def test_importing_the_module_is_cheap() -> None:
    code = "import sys, appliance.metrics; print('prometheus_client' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert out.stdout.strip() == "False"


# The Grafana dashboard.


def dashboard_exprs(node: Any) -> Iterator[str]:
    """Every PromQL expression in the dashboard: panel targets and variable queries."""
    if isinstance(node, dict):
        for key, item in node.items():
            if key in ("expr", "definition") and isinstance(item, str):
                yield item
            else:
                yield from dashboard_exprs(item)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_exprs(item)


def exposed_names(text: str) -> set[str]:
    """Names a query may use: every family and sample name, with a counter's ``_total``."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        names.update(s.name for s in family.samples)
    return names


def test_dashboard_queries_only_use_defined_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = list(dashboard_exprs(dashboard))
    assert len(exprs) >= 15
    known = exposed_names(Metrics().render().decode())
    used = {name for expr in exprs for name in re.findall(r"\bappliance_[A-Za-z0-9_]+", expr)}
    unknown = {
        name
        for name in used
        if name not in known
        and not any(name.endswith(s) and name.removesuffix(s) in known for s in SUFFIXES)
    }
    assert not unknown, f"the dashboard queries metrics that metrics.py does not define: {unknown}"
    # The panels the operators asked for are there.
    for needed in (
        "appliance_questions_total",
        "appliance_abstentions_total",
        "appliance_answer_errors_total",
        "appliance_time_to_first_token_seconds_bucket",
        "appliance_retrieval_seconds_bucket",
        "appliance_generated_tokens_total",
        "appliance_documents_indexed",
        "appliance_chunks_indexed",
        "appliance_ingest_queue_depth",
        "appliance_ingest_failures_total",
        "appliance_ingest_last_success_timestamp_seconds",
        "appliance_feedback_total",
        "appliance_active_model_info",
        "appliance_chat_queue_depth",
        "appliance_chat_queue_wait_seconds_bucket",
        "appliance_chat_active_slots",
        "appliance_chat_decode_batch_size_bucket",
        "appliance_chat_decode_tokens_total",
    ):
        assert needed in used, needed


def test_dashboard_uses_the_prometheus_input_everywhere() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["schemaVersion"] >= 36
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
