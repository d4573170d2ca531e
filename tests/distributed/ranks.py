"""Run kvrun Workers as real ranks, one process each, and greedy-decode some prompts.

``python -m tests.distributed.ranks JOBS.json SUMMARY.json`` runs each job of the list in
turn: ``{"name", "model", "tp", "pp", "prompts", "max_tokens", "out", "env"?, "timeout_s"?,
"init_method"?, "ranks"?, "blocks"?}`` (``ranks``: start only these; ``blocks``: a fixed
KV cache, ``null`` for the platform's budget), and writes ``{name: ranks that failed}``
to SUMMARY.json.
For each it starts tp * pp processes (multiprocessing spawn), every one a
:class:`kvrun.distributed.worker.Worker`; they decode the prompts together (one batched
prefill step, then batched decode steps), the driver rank choosing each next token as
the argmax of its logits and handing it to the others (a broadcast over the default
group). The driver saves ``{"tokens", "logits", "blocks", "prompt_logits"}`` (the first
request's, asked for at the prefill) to ``out`` (torch.save);
a rank that fails writes ``{"error": message, "rank": r}`` to ``out + ".rank<r>"``.

The tests run this inside a network namespace of its own (``unshare -n``, loopback up),
so gloo never reaches past loopback.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import signal
import sys
import time
import traceback
from typing import Any

import torch


def _chunks(
    requests: list[list[int]], new: list[list[int]], block_size: int, first: bool
) -> list[Any]:
    from kvrun.scheduling.output import ScheduledChunk

    chunks = []
    per = 8  # blocks per request: max_model_len=128 at 16 tokens a block
    for i, prompt in enumerate(requests):
        known = len(prompt) + len(new[i])
        tokens = prompt if first else new[i][-1:]
        start = 0 if first else known - 1
        chunks.append(
            ScheduledChunk(
                request_id=f"r{i}",
                token_ids=list(tokens),
                start_position=start,
                block_ids=list(range(i * per, (i + 1) * per)),
                samples=True,
                is_prefill=first,
            )
        )
    assert max(len(p) for p in requests) + 64 <= per * block_size
    return chunks


def _rank_main(rank: int, job: dict[str, Any]) -> None:
    from kvrun.config import EngineArgs
    from kvrun.distributed.worker import Worker, WorkerSpec

    spec = WorkerSpec(
        rank=rank,
        local_rank=rank,
        tensor_parallel_size=job["tp"],
        pipeline_parallel_size=job["pp"],
        init_method=job["init_method"],
    )
    # only the cpu plugin: probing the others (openvino's import) in every rank is slow
    environ = {
        **os.environ,
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_PLUGINS": "cpu",
        **job.get("env", {}),
    }
    # a rank never outlives its runner (killed by the test's timeout): SIGKILL with it
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    torch.set_num_threads(1)  # as an executor gives each rank its share of the cores
    worker = None
    started = time.monotonic()
    try:
        args = EngineArgs(
            model=job["model"],
            dtype="float32",
            max_model_len=128,
            num_kv_blocks=job.get("blocks", 8 * len(job["prompts"])),
        )
        worker = Worker(args, environ, spec)
        started = time.monotonic()
        worker.init_distributed(job.get("timeout_s", 30.0))
        worker.load_model()
        blocks = worker.kv_cache_blocks()
        worker.init_kv_cache(blocks)
        assert worker.commit_kv_cache() > 0
        prompts: list[list[int]] = job["prompts"]
        new: list[list[int]] = [[] for _ in prompts]
        logits_seen = []
        prompt_logits: dict[str, torch.Tensor] = {}
        driver = spec.parallel.driver_rank
        import torch.distributed as dist

        for step in range(job["max_tokens"]):
            chunks = _chunks(prompts, new, worker.config.block_size, step == 0)
            # the first request's prompt logprobs: every prompt row's logits, on the driver
            wanted = frozenset({"r0"}) if step == 0 else frozenset()
            out = worker.execute(chunks, wanted, frozenset())
            chosen = torch.zeros(len(prompts), dtype=torch.int64)
            if rank == driver:
                assert out is not None and out.request_ids == [c.request_id for c in chunks]
                logits_seen.append(out.logits.clone())
                prompt_logits.update(out.prompt_logits)
                chosen = out.logits.argmax(dim=-1)
            else:
                assert out is None
            dist.broadcast(chosen, src=driver)
            for i, token in enumerate(chosen.tolist()):
                new[i].append(token)
        if rank == driver:
            result = {"tokens": new, "logits": logits_seen, "blocks": blocks}
            torch.save({**result, "prompt_logits": prompt_logits["r0"]}, job["out"])
    except BaseException as exc:
        with open(f"{job['out']}.rank{rank}", "w") as f:
            json.dump({"error": str(exc), "type": type(exc).__name__, "rank": rank,
                       "elapsed": time.monotonic() - started,
                       "trace": traceback.format_exc()}, f)  # fmt: skip
        raise
    finally:
        if worker is not None:
            worker.close()


def run_job(job: dict[str, Any]) -> int:
    """Run one job's ranks to the end; the number of ranks that failed."""
    from kvrun.distributed.state import init_method, rendezvous_address
    from kvrun.envs import read_env

    if "init_method" not in job:
        env = read_env({**os.environ, **job.get("env", {})})
        job = {**job, "init_method": init_method(*rendezvous_address(env))}
    # fork: the ranks inherit this process's imports (torch, kvrun), which it has run no
    # kernel with, so no OpenMP pool is copied half-alive
    ctx = multiprocessing.get_context("fork")
    ranks = job.get("ranks", range(job["tp"] * job["pp"]))
    procs = [ctx.Process(target=_rank_main, args=(r, job)) for r in ranks]
    for p in procs:
        p.start()
    deadline = job.get("timeout_s", 30.0) + 120
    failed = 0
    for p in procs:
        p.join(deadline)
        if p.is_alive():  # never leave a rank behind
            p.kill()
            p.join()
        failed += p.exitcode != 0
    return failed


def main() -> None:
    import kvrun.distributed.worker  # noqa: F401 - imported once, before the forks
    import kvrun_cpu.platform  # noqa: F401

    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    failed = {job["name"]: run_job(job) for job in jobs}
    with open(sys.argv[2], "w") as f:
        json.dump(failed, f)


if __name__ == "__main__":
    main()
