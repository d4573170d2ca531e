"""Prometheus metrics under vLLM's names, in a registry owned by one app.

Engine gauges and counters (running, waiting, KV usage, token and prefix-cache
totals, preemptions) are read from the engine's latest stats when scraped;
latencies are observed by the frontend as outputs arrive. Nothing is registered
in prometheus_client's global registry, so two apps in one process do not clash.

Every metric is labelled ``model_name`` and ``engine`` (the data-parallel rank, "0"
with one engine), as vLLM labels them: a sum over ``engine`` is the server's total.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from kvrun.stats import EngineStats

__all__ = ["CONTENT_TYPE_LATEST", "RequestTimes", "ServerMetrics"]

# vLLM's buckets, so dashboards' histogram_quantile panels keep their resolution.
_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


@dataclass
class RequestTimes:
    """One request's timeline as the frontend saw it (time.monotonic seconds)."""

    arrival: float
    first_token: float | None = None
    last_token: float | None = None
    num_generation_tokens: int = 0
    engine: int = 0  # the engine (data-parallel rank) that runs the request


_LABELS = ["model_name", "engine"]

_GAUGES: tuple[tuple[str, str, Callable[[EngineStats], float]], ...] = (
    (
        "vllm:num_requests_running",
        "Requests in the running batch.",
        lambda s: s.scheduler.num_running,
    ),
    (
        "vllm:num_requests_waiting",
        "Requests waiting to be scheduled.",
        lambda s: s.scheduler.num_waiting,
    ),
    (
        "vllm:kv_cache_usage_perc",
        "KV-cache usage: 1 means every block is in use.",
        lambda s: s.scheduler.kv_cache_usage,
    ),
)
_COUNTERS: tuple[tuple[str, str, Callable[[EngineStats], float]], ...] = (
    ("vllm:prompt_tokens", "Prefill tokens processed.", lambda s: s.prompt_tokens_total),
    ("vllm:generation_tokens", "Generated tokens.", lambda s: s.generation_tokens_total),
    (
        "vllm:num_preemptions",
        "Preemptions by the scheduler.",
        lambda s: s.scheduler.num_preemptions_total,
    ),
    (
        "vllm:prefix_cache_queries",
        "Prompt tokens looked up in the prefix cache.",
        lambda s: s.scheduler.prefix_cache_queries,
    ),
    (
        "vllm:prefix_cache_hits",
        "Prompt tokens found in the prefix cache.",
        lambda s: s.scheduler.prefix_cache_hits,
    ),
)


class _EngineStatsCollector(Collector):
    def __init__(
        self, model_name: str, stats: Callable[[], Mapping[int, EngineStats | None]]
    ) -> None:
        self._model = model_name
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        by_engine = sorted((e, s) for e, s in self._stats().items() if s is not None)
        if not by_engine:
            return
        for name, doc, read in _GAUGES:
            gauge = GaugeMetricFamily(name, doc, labels=_LABELS)
            for engine, stats in by_engine:
                gauge.add_metric([self._model, str(engine)], float(read(stats)))
            yield gauge
        for name, doc, read in _COUNTERS:
            counter = CounterMetricFamily(name, doc, labels=_LABELS)
            for engine, stats in by_engine:
                counter.add_metric([self._model, str(engine)], float(read(stats)))
            yield counter


class ServerMetrics:
    """The /metrics registry of one app."""

    def __init__(
        self, model_name: str, stats: Callable[[], Mapping[int, EngineStats | None]]
    ) -> None:
        """``stats``: each engine's (data-parallel rank's) latest stats, by rank."""
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineStatsCollector(model_name, stats))
        labels = _LABELS
        self.request_success = Counter(
            "vllm:request_success",
            "Sequences finished, by finish reason.",
            [*_LABELS, "finished_reason"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between consecutive outputs of a request.",
            labels,
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            labels,
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Time from arrival to the last token.",
            labels,
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        )

    def on_tokens(self, times: RequestTimes, now: float, num_new: int) -> None:
        """Record ``num_new`` tokens of a request arriving at ``now``."""
        if num_new <= 0:
            return
        if times.first_token is None:
            times.first_token = now
            self.ttft.labels(self.model_name, str(times.engine)).observe(now - times.arrival)
        elif times.last_token is not None:
            self.itl.labels(self.model_name, str(times.engine)).observe(now - times.last_token)
        times.last_token = now
        times.num_generation_tokens += num_new

    def on_finished(self, times: RequestTimes, now: float, finish_reasons: list[str]) -> None:
        engine = str(times.engine)
        for reason in finish_reasons:
            self.request_success.labels(self.model_name, engine, reason).inc()
        self.e2e.labels(self.model_name, engine).observe(now - times.arrival)
        if times.first_token is not None and times.num_generation_tokens > 1:
            decode = (times.last_token or now) - times.first_token
            self.tpot.labels(self.model_name, engine).observe(
                decode / (times.num_generation_tokens - 1)
            )

    def render(self) -> bytes:
        return generate_latest(self.registry)
