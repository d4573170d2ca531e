"""Runs of the mp executor with pipeline parallelism and batches in flight, for
tests/executor/test_pipeline_in_flight.py; each in a process of its own inside a
loopback-only network namespace (tests/executor/scenarios.run_scenario).

``python -m tests.executor.pipeline_scenarios NAME JSON`` prints ``RESULT <json>``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from tests.executor.scenarios import alive, scenario_main, segments

# several lengths; the last two share a 20-token prefix (the prefix cache's case)
SHARED = [(7 * j) % 900 + 5 for j in range(20)]
PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11],
    [100, 200, 300],
    [1, 4, 9, 16, 25, 36, 49, 64, 81, 100],
    [(13 * j) % 1000 + 3 for j in range(37)],
    [42],
    [*SHARED, 11, 12, 13],
    [*SHARED, 21, 22],
]


def _engine(model: str, **options: Any) -> Any:
    from kvrun import LLM

    base: dict[str, Any] = {"dtype": "float32", "max_model_len": 128, "num_kv_blocks": 64}
    return LLM(model, **{**base, **options}).llm_engine


def _drive(
    engine: Any, requests: list[tuple[str, list[int], Any]], abort: str | None = None
) -> dict[str, Any]:
    """Add ``requests``, step until idle; per request its streamed tokens and text (the
    deltas concatenated), finish reason and stop reason. ``abort``: a request id aborted
    at the first step after which it has a batch in flight (recorded as "aborted_at":
    the tokens it had then)."""
    streamed: dict[str, dict[str, Any]] = {}
    for request_id, prompt, params in requests:
        engine.add_request(request_id, prompt, params)
        streamed[request_id] = {"tokens": [], "text": "", "finish": None, "stop": None}
    result: dict[str, Any] = {"aborted_at": None, "max_in_flight": 0}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            break
        for delta in engine.step():
            entry = streamed[delta.request_id]
            for seq in delta.sequences:
                entry["tokens"] += seq.token_ids
                entry["text"] += seq.text
                entry["finish"], entry["stop"] = seq.finish_reason, seq.stop_reason
            entry["finished"] = delta.finished
        result["max_in_flight"] = max(result["max_in_flight"], engine.scheduler.num_in_flight)
        waiting = abort is not None and result["aborted_at"] is None
        if waiting and engine.scheduler.is_in_flight(abort):
            result["aborted_at"] = list(streamed[abort]["tokens"])
            engine.abort_request([abort])
    result["requests"] = streamed
    stats = engine.scheduler.stats
    result["free_blocks"] = [stats.num_free_blocks, stats.num_blocks]
    result["preemptions"] = stats.num_preemptions_total
    result["prefix_hits"] = stats.prefix_cache_hits
    result["unfinished"] = engine.has_unfinished_requests() or engine.scheduler.num_in_flight
    return result


def _requests(stop_string: str | None, stop_token: int | None) -> list[tuple[str, list[int], Any]]:
    from kvrun import SamplingParams

    greedy = {"temperature": 0.0, "ignore_eos": True}
    out = []
    for i, prompt in enumerate(PROMPTS):
        params = SamplingParams(max_tokens=6 + 3 * i, **greedy)  # type: ignore[arg-type]
        out.append((f"g{i}", prompt, params))
    # seeded sampling: the same draws from the same logits, whoever runs the step
    out.append(("seeded", PROMPTS[2], SamplingParams(max_tokens=12, temperature=1.0, seed=7)))
    if stop_string is not None:
        out.append(("stop-str", PROMPTS[0], SamplingParams(max_tokens=24, stop=[stop_string], **greedy)))  # type: ignore[arg-type]  # fmt: skip
    if stop_token is not None:
        out.append(("stop-tok", PROMPTS[3], SamplingParams(max_tokens=24, stop_token_ids=[stop_token], **greedy)))  # type: ignore[arg-type]  # fmt: skip
    return out


def in_flight(model: str) -> dict[str, Any]:
    """The same requests on TP=1 in process and on PP=2 with batches in flight: a roomy
    cache, a second wave (prefix hits), an abort; on a second executor one request
    alone, then a cache small enough to preempt."""
    import torch

    from kvrun import SamplingParams

    torch.set_num_threads(1)  # no OpenMP pool here: workers start by fork
    out: dict[str, Any] = {}
    uni = _engine(model)
    # stop conditions taken from what TP=1 generates, so that they do trigger
    probe = _drive(uni, _requests(None, None))
    text0 = probe["requests"]["g0"]["text"]
    stop_string = text0[len(text0) // 2 : len(text0) // 2 + 3]
    stop_token = probe["requests"]["g3"]["tokens"][5]
    requests = _requests(stop_string, stop_token)
    out["uni"] = _drive(uni, requests)
    out["uni_wave2"] = _drive(uni, [(f"w2-{rid}", p, sp) for rid, p, sp in requests])
    out["stop_string"], out["stop_token"] = stop_string, stop_token

    pp = _engine(model, distributed_executor_backend="mp", pipeline_parallel_size=2)
    runner = pp.runner
    out["runner"] = type(runner).__name__
    out["max_concurrent_batches"] = runner.max_concurrent_batches
    out["pp"] = _drive(pp, requests)
    out["pp_wave2"] = _drive(pp, [(f"w2-{rid}", p, sp) for rid, p, sp in requests])
    out["pp_abort"] = _drive(pp, [(f"a-{rid}", p, sp) for rid, p, sp in requests], abort="a-g3")
    out["peak_in_flight"] = runner.peak_in_flight
    pids = list(runner.pids)
    names = [runner.segment_name]
    runner.close()

    # 12 blocks of 16 tokens for 10 requests of up to 61 tokens: preemption by recompute
    tiny = _engine(
        model, distributed_executor_backend="mp", pipeline_parallel_size=2, num_kv_blocks=12,
        max_num_seqs=8, max_model_len=64,
    )  # fmt: skip
    # first one request alone on the fresh executor: nothing to overlap (its next step
    # needs this one's token), so one batch at a time, and the output still TP=1's
    only = [("only", PROMPTS[2], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))]
    out["one_request"] = {
        "uni": _drive(uni, only),
        "pp": _drive(tiny, only),
        "peak_in_flight": tiny.runner.peak_in_flight,
    }
    out["pp_tiny"] = _drive(tiny, requests)
    out["tiny_block_size"] = tiny.config.block_size
    pids += tiny.runner.pids
    names.append(tiny.runner.segment_name)
    tiny.runner.close()
    out["alive_after_close"] = [p for p in pids if alive(p)]
    # this run's rings only: other tests may run beside this one
    out["segments"] = names
    out["segments_left"] = [name for name in segments() if name in names]
    return out


SCENARIOS: dict[str, Callable[..., Any]] = {"in_flight": in_flight}

if __name__ == "__main__":
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    scenario_main(SCENARIOS.__getitem__)
