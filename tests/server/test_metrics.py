"""/metrics rendering: vLLM's names, engine stats read at scrape time, latencies observed."""

from __future__ import annotations

from kvrun.scheduling import SchedulerStats
from kvrun.server.metrics import RequestTimes, ServerMetrics
from kvrun.stats import EngineStats


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_engine_stats_under_vllm_names() -> None:
    stats: list[EngineStats | None] = [None]
    metrics = ServerMetrics("m", lambda: {0: stats[0]})
    assert "vllm:num_requests_running" not in metrics.render().decode()
    stats[0] = EngineStats(SchedulerStats(3, 2, 0.25, 6, 8, 100, 40, 1), 500, 70)
    got = _samples(metrics.render().decode())
    assert got['vllm:num_requests_running{engine="0",model_name="m"}'] == 3
    assert got['vllm:num_requests_waiting{engine="0",model_name="m"}'] == 2
    assert got['vllm:kv_cache_usage_perc{engine="0",model_name="m"}'] == 0.25
    assert got['vllm:prompt_tokens_total{engine="0",model_name="m"}'] == 500
    assert got['vllm:generation_tokens_total{engine="0",model_name="m"}'] == 70
    assert got['vllm:num_preemptions_total{engine="0",model_name="m"}'] == 1
    assert got['vllm:prefix_cache_queries_total{engine="0",model_name="m"}'] == 100
    assert got['vllm:prefix_cache_hits_total{engine="0",model_name="m"}'] == 40


def test_latencies_and_successes() -> None:
    metrics = ServerMetrics("m", lambda: {})
    times = RequestTimes(arrival=10.0)
    metrics.on_tokens(times, 10.5, 1)  # TTFT 0.5
    metrics.on_tokens(times, 10.6, 1)  # ITL 0.1
    metrics.on_tokens(times, 10.9, 1)  # ITL 0.3
    metrics.on_tokens(times, 11.0, 0)  # no tokens: nothing observed
    metrics.on_finished(times, 11.0, ["length", "stop"])
    got = _samples(metrics.render().decode())
    assert got['vllm:time_to_first_token_seconds_count{engine="0",model_name="m"}'] == 1
    assert got['vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"}'] == 0.5
    assert got['vllm:inter_token_latency_seconds_count{engine="0",model_name="m"}'] == 2
    assert abs(got['vllm:inter_token_latency_seconds_sum{engine="0",model_name="m"}'] - 0.4) < 1e-9
    assert (
        abs(got['vllm:time_per_output_token_seconds_sum{engine="0",model_name="m"}'] - 0.2) < 1e-9
    )
    assert got['vllm:e2e_request_latency_seconds_sum{engine="0",model_name="m"}'] == 1.0
    assert (
        got['vllm:request_success_total{engine="0",finished_reason="length",model_name="m"}'] == 1
    )
    assert got['vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"}'] == 1


def test_two_apps_do_not_share_a_registry() -> None:
    a = ServerMetrics("a", lambda: {})
    b = ServerMetrics("b", lambda: {})
    a.on_finished(RequestTimes(arrival=0.0), 1.0, ["stop"])
    assert (
        'vllm:request_success_total{engine="0",finished_reason="stop",model_name="a"}'
        in a.render().decode()
    )
    assert "vllm:request_success_total{" not in b.render().decode()


def test_each_engine_is_labelled() -> None:
    """Data parallelism: one sample per engine (vLLM's ``engine`` label); the sum over
    engines is the server's total, and frontend latencies carry the request's engine."""
    ranks = {
        0: EngineStats(SchedulerStats(3, 2, 0.25, 6, 8, 100, 40, 1), 500, 70),
        1: EngineStats(SchedulerStats(1, 0, 0.5, 4, 8, 30, 0, 0), 50, 9),
    }
    metrics = ServerMetrics("m", lambda: ranks)
    times = RequestTimes(arrival=1.0, engine=1)
    metrics.on_tokens(times, 1.5, 1)
    metrics.on_finished(times, 2.0, ["stop"])
    got = _samples(metrics.render().decode())
    assert got['vllm:num_requests_running{engine="0",model_name="m"}'] == 3
    assert got['vllm:num_requests_running{engine="1",model_name="m"}'] == 1
    assert got['vllm:generation_tokens_total{engine="1",model_name="m"}'] == 9
    assert got['vllm:kv_cache_usage_perc{engine="1",model_name="m"}'] == 0.5
    assert got['vllm:time_to_first_token_seconds_count{engine="1",model_name="m"}'] == 1
    assert 'vllm:time_to_first_token_seconds_count{engine="0",model_name="m"}' not in got
    assert got['vllm:request_success_total{engine="1",finished_reason="stop",model_name="m"}'] == 1
