"""Prometheus metrics of the core service, and a small ``/metrics`` endpoint.

``Metrics`` owns its own ``CollectorRegistry`` (never the global default one), so a process, or a
test, can hold several. The service reports events to it (``observe_answer``, ``feedback``,
``login`` ...) and ``MetricsServer`` serves ``render()`` on ``GET /metrics`` for Prometheus.

Every metric is prefixed ``appliance_``; durations are histograms in seconds, counters end in
``_total``. ``prometheus_client`` is imported when a ``Metrics`` is built, so importing this module
is cheap; a missing library raises ``ConfigError`` with the ``pip install`` that mends it.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from appliance.core.errors import ServiceError, missing_dependency

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

LATENCY_BUCKETS: Final = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
)
"""Histogram buckets (seconds) for 10 ms retrievals up to two-minute CPU generations."""

DECODE_BATCH_BUCKETS: Final = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
"""Histogram buckets of sequences per decode step, up to the largest ``chat.parallel``."""

FEEDBACK_RATINGS: Final = ("up", "down")

POLL_INTERVAL_S: Final = 0.1
"""How often the server thread checks for ``stop()``: the longest ``stop()`` waits."""


def _number(value: Any) -> float | None:
    """A finite, non-negative number from a timings entry, or None for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


class _PreScrape:
    """A collector with no metrics of its own: it runs a callback before the others collect.

    Registered first, so gauges it refreshes are read fresh in the same scrape. A callback that
    raises is logged and counted; the scrape still succeeds with the previous values.
    """

    def __init__(self, callback: Callable[[], None], on_error: Callable[[], None]) -> None:
        self._callback = callback
        self._on_error = on_error

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        try:
            self._callback()
        except Exception:
            log.warning(
                "the metrics refresh callback failed; serving previous values", exc_info=True
            )
            self._on_error()
        return []


class Metrics:
    """The core service's Prometheus metrics, in a registry of their own.

    ``collect``, when given, runs before every scrape (for example to call ``set_ingest`` with
    the current ingestion status); when it raises, the scrape serves the previous values and
    ``appliance_metrics_collect_errors_total`` counts the failure.
    """

    CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
    """The content type of ``render()``: the Prometheus text exposition format 0.0.4."""

    def __init__(self, collect: Callable[[], None] | None = None) -> None:
        try:
            import prometheus_client as prom
        except ImportError as exc:
            raise missing_dependency("prometheus_client", package="prometheus-client") from exc

        self._generate = prom.generate_latest
        self._model_lock = threading.Lock()
        self.registry: CollectorRegistry = prom.CollectorRegistry()
        reg = self.registry

        self.collect_errors = prom.Counter(
            "appliance_metrics_collect_errors",
            "Pre-scrape refresh callbacks that raised (the scrape served previous values).",
            registry=None,
        )
        if collect is not None:
            reg.register(_PreScrape(collect, self.collect_errors.inc))
        reg.register(self.collect_errors)

        # Answers.
        self.questions = prom.Counter(
            "appliance_questions", "Questions answered (including abstentions).", registry=reg
        )
        self.abstentions = prom.Counter(
            "appliance_abstentions",
            "Questions the assistant declined to answer from the documents.",
            registry=reg,
        )
        self.answer_errors = prom.Counter(
            "appliance_answer_errors",
            "Questions that failed with an error, by kind (a small fixed set, such as an "
            "exception class name).",
            ["kind"],
            registry=reg,
        )
        self.retrieval_seconds = prom.Histogram(
            "appliance_retrieval_seconds",
            "Time from the question to the passages being chosen.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.ttft_seconds = prom.Histogram(
            "appliance_time_to_first_token_seconds",
            "Time from the question to the first answer token shown.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.generation_seconds = prom.Histogram(
            "appliance_generation_seconds",
            "Time the chat model spent on an answer (prompt processing and decoding): total "
            "time minus retrieval, for answers the model generated.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.generated_tokens = prom.Counter(
            "appliance_generated_tokens",
            "Completion tokens the chat model generated.",
            registry=reg,
        )

        # The queue in front of the chat model, and the engine's decode steps.
        self.chat_queue_depth = prom.Gauge(
            "appliance_chat_queue_depth",
            "Questions waiting for a generation slot (not those being answered).",
            registry=reg,
        )
        self.chat_active_slots = prom.Gauge(
            "appliance_chat_active_slots",
            "Generation slots answering a question now.",
            registry=reg,
        )
        self.chat_slots = prom.Gauge(
            "appliance_chat_slots",
            "Generation slots configured (chat.parallel).",
            registry=reg,
        )
        self.chat_queue_wait_seconds = prom.Histogram(
            "appliance_chat_queue_wait_seconds",
            "Time from a question's arrival to its generation slot (its retrieval included, "
            "which runs while it waits).",
            buckets=(*LATENCY_BUCKETS, 300.0, 600.0),
            registry=reg,
        )
        self.chat_queue_rejected = prom.Counter(
            "appliance_chat_queue_rejected",
            "Questions refused with HTTP 503 because the queue was at its limit.",
            registry=reg,
        )
        self.decode_batch_size = prom.Histogram(
            "appliance_chat_decode_batch_size",
            "Sequences decoded together in one decode step of the chat engine.",
            buckets=DECODE_BATCH_BUCKETS,
            registry=reg,
        )
        self.decode_tokens = prom.Counter(
            "appliance_chat_decode_tokens",
            "Tokens produced by the chat engine's decode steps, all sequences together (its "
            "rate is the aggregate decode throughput).",
            registry=reg,
        )

        # Ingestion.
        self.documents_indexed = prom.Gauge(
            "appliance_documents_indexed", "Documents in the active index.", registry=reg
        )
        self.chunks_indexed = prom.Gauge(
            "appliance_chunks_indexed", "Chunks in the active index.", registry=reg
        )
        self.ingest_queue_depth = prom.Gauge(
            "appliance_ingest_queue_depth",
            "Documents queued, being parsed or being embedded.",
            registry=reg,
        )
        self.ingest_failed_documents = prom.Gauge(
            "appliance_ingest_failed_documents",
            "Documents whose last ingestion failed.",
            registry=reg,
        )
        self.ingest_last_success = prom.Gauge(
            "appliance_ingest_last_success_timestamp_seconds",
            "Unix time of the last successful ingestion run (0 before the first).",
            registry=reg,
        )
        self.ingest_failures = prom.Counter(
            "appliance_ingest_failures", "Document ingestions that failed.", registry=reg
        )

        # Users, model and API.
        self.feedback_total = prom.Counter(
            "appliance_feedback", "Answer ratings given by users.", ["rating"], registry=reg
        )
        self.active_model = prom.Gauge(
            "appliance_active_model_info",
            "The chat model in use (always 1; the labels say which).",
            ["model", "version", "origin"],
            registry=reg,
        )
        self.logins = prom.Counter(
            "appliance_logins", "Login attempts, by result.", ["result"], registry=reg
        )
        self.http_requests = prom.Counter(
            "appliance_http_requests",
            "Requests to the local API, by route and HTTP status.",
            ["route", "status"],
            registry=reg,
        )
        for rating in FEEDBACK_RATINGS:
            self.feedback_total.labels(rating=rating)
        for result in ("success", "failure"):
            self.logins.labels(result=result)

    def observe_answer(self, answer: Mapping[str, Any]) -> None:
        """Count one answered question from its JSON (``Answer.as_json()``); missing or
        non-numeric timings are skipped."""
        self.questions.inc()
        if answer.get("abstained"):
            self.abstentions.inc()
        timings = answer.get("timings") or {}
        retrieval = _number(timings.get("retrieval_s"))
        ttft = _number(timings.get("ttft_s"))
        total = _number(timings.get("total_s"))
        if retrieval is not None:
            self.retrieval_seconds.observe(retrieval)
        if ttft is not None:
            # Only answers the chat model generated have a time to first token.
            self.ttft_seconds.observe(ttft)
            if total is not None:
                self.generation_seconds.observe(max(total - (retrieval or 0.0), 0.0))
        tokens = _number(timings.get("completion_tokens"))
        if tokens:
            self.generated_tokens.inc(tokens)

    # --- the queue (``appliance.turnstile.QueueObserver``) and the chat engine -----------------

    def queue_changed(self, waiting: int, running: int) -> None:
        self.chat_queue_depth.set(waiting)
        self.chat_active_slots.set(running)

    def queue_waited(self, seconds: float) -> None:
        self.chat_queue_wait_seconds.observe(max(seconds, 0.0))

    def queue_rejected(self) -> None:
        self.chat_queue_rejected.inc()

    def set_slots(self, slots: int) -> None:
        self.chat_slots.set(slots)

    def observe_decode_step(self, batch_size: int, tokens: int) -> None:
        """One decode step of the chat engine: ``batch_size`` sequences decoded together,
        ``tokens`` tokens produced (a batched engine calls this per ``llama_decode``; answers
        count their tokens in ``appliance_generated_tokens`` whatever the engine)."""
        if batch_size > 0:
            self.decode_batch_size.observe(batch_size)
        if tokens > 0:
            self.decode_tokens.inc(tokens)

    def answer_error(self, kind: str) -> None:
        """Count a question that failed; ``kind`` should come from a small fixed set."""
        self.answer_errors.labels(kind=kind or "unknown").inc()

    def set_ingest(self, status: Mapping[str, Any], last_success: float | None = None) -> None:
        """Set the ingestion gauges from a status (``Indexer.status()``); keys that are missing
        leave their gauge as it was. ``last_success`` is the Unix time of the last good run."""
        if "documents" in status:
            self.documents_indexed.set(status["documents"])
        if "chunks" in status:
            self.chunks_indexed.set(status["chunks"])
        if "failed" in status:
            self.ingest_failed_documents.set(len(status["failed"]))
        if "in_progress" in status:
            self.ingest_queue_depth.set(len(status["in_progress"]))
        if last_success is not None:
            self.ingest_last_success.set(last_success)

    def ingest_failure(self, count: int = 1) -> None:
        """Count ``count`` document ingestions that failed."""
        self.ingest_failures.inc(count)

    def feedback(self, rating: str) -> None:
        """Count a user's rating of an answer: ``"up"`` or ``"down"``."""
        if rating not in FEEDBACK_RATINGS:
            raise ValueError(f"feedback rating {rating!r} is not one of {FEEDBACK_RATINGS}")
        self.feedback_total.labels(rating=rating).inc()

    def login(self, ok: bool) -> None:
        """Count a login attempt."""
        self.logins.labels(result="success" if ok else "failure").inc()

    def http_request(self, route: str, status: int) -> None:
        """Count a local API request; ``route`` is the route's template, never a raw path."""
        self.http_requests.labels(route=route, status=str(status)).inc()

    def set_model(self, name: str, version: str, origin: str) -> None:
        """Say which chat model is active; the previous model's series disappears."""
        with self._model_lock:
            self.active_model.clear()
            self.active_model.labels(model=name, version=version, origin=origin).set(1)

    def render(self) -> bytes:
        """The metrics in the Prometheus text format (``CONTENT_TYPE``)."""
        return self._generate(self.registry)


class MetricsServer:
    """Serves ``GET /metrics`` from a ``Metrics`` on a daemon thread; 404 for other paths.

    ``port=0`` picks a free port; ``port`` says which once started. Use it as a context manager,
    or call ``start()`` and ``stop()``.
    """

    def __init__(self, metrics: Metrics, host: str = "127.0.0.1", port: int = 9108) -> None:
        self.metrics = metrics
        self.host = host
        self._port = port
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port served on; before ``start()``, the port asked for."""
        return self._httpd.server_address[1] if self._httpd is not None else self._port

    def start(self) -> None:
        """Listen and serve; does nothing when already serving."""
        if self._httpd is not None:
            return
        metrics = self.metrics

        class _Request(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("metrics: " + fmt, *args)

            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = metrics.render()
                except Exception:
                    log.exception("rendering the metrics failed")
                    self.send_error(500, "rendering the metrics failed")
                    return
                self.send_response(200)
                self.send_header("Content-Type", Metrics.CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        try:
            httpd = ThreadingHTTPServer((self.host, self._port), _Request)
        except OSError as exc:
            raise ServiceError(
                f"the metrics endpoint cannot listen on {self.host}:{self._port}: "
                f"{exc.strerror or exc}; set the metrics port to a free one (0 picks any)"
            ) from exc
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, args=(POLL_INTERVAL_S,), name="metrics", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and free the port; safe to call twice or before ``start()``."""
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
