"""Runs of the mp executor for tests/executor, each in a process of its own inside a
network namespace whose only interface is loopback (gloo would otherwise pick the
machine's outward address).

``python -m tests.executor.scenarios NAME JSON`` runs scenario NAME with the keyword
arguments in JSON and prints ``RESULT <json>`` as its last line. :func:`run` does that
under ``unshare -n`` for a test. :func:`run_scenarios` runs a list of scenarios in one
such process (one interpreter, torch and kvrun imported once), each reported on its own
(``python -m MODULE --many JSON``; :func:`scenario_main` is every scenario module's
``__main__``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SEGMENT_PREFIX = "kvrun_mp_"
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 200, 300], [1, 4, 9, 16, 25, 36, 49, 64, 81, 100]]


def run(name: str, timeout_s: float = 300, env: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """Run scenario ``name`` in its own network namespace; its result."""
    return run_scenario("tests.executor.scenarios", name, timeout_s, env, **kwargs)


def run_scenario(
    module: str,
    name: str,
    timeout_s: float,
    env: dict[str, str] | None = None,
    unset: tuple[str, ...] = (),
    **kwargs: Any,
) -> Any:
    """``python -m module name JSON`` in its own network namespace (the cpu platform,
    passive OpenMP, ``env`` added, ``unset`` removed); the ``RESULT`` it printed last."""
    command, environ = _in_namespace(module, name, json.dumps(kwargs), env, unset)
    done = subprocess.run(
        command,
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (
        f"scenario {name} failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-20000:]}"
    )
    return json.loads(lines[-1][len("RESULT ") :])


MANY = "--many"


class ScenarioResults(dict[str, Any]):
    """Each scenario's result by its label; reading a label whose scenario failed (or
    never reported: the process died or timed out first) fails, with the traceback or
    the process's output."""

    def __init__(self, failures: dict[str, str], output: str) -> None:
        super().__init__()
        self.failures = failures
        self.output = output

    def __missing__(self, label: str) -> Any:
        if label in self.failures:
            raise AssertionError(f"scenario {label} failed:\n{self.failures[label]}")
        raise AssertionError(f"scenario {label} did not report:\n{self.output}")


def run_scenarios(
    module: str,
    scenarios: list[tuple[str, str, dict[str, Any]]],
    timeout_s: float,
    env: dict[str, str] | None = None,
    unset: tuple[str, ...] = (),
) -> ScenarioResults:
    """Several scenarios, ``(label, name, kwargs)`` each, in order in one process in its
    own network namespace (as :func:`run_scenario`); a failing scenario is reported
    (reading its label raises) and the next ones still run."""
    command, environ = _in_namespace(module, MANY, json.dumps(scenarios), env, unset)
    try:
        done = subprocess.run(
            command,
            cwd=REPO,
            env=environ,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        stdout, tail = done.stdout, f"exit {done.returncode}\n{done.stderr[-20000:]}"
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        tail = f"timed out after {timeout_s} s\n{stderr[-20000:]}"
    failures: dict[str, str] = {}
    results = ScenarioResults(failures, f"{stdout[-5000:]}\n{tail}")
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            label, result = json.loads(line[len("RESULT ") :])
            results[label] = result
        elif line.startswith("FAILED "):
            label, error = json.loads(line[len("FAILED ") :])
            failures[label] = error
    return results


def scenario_main(lookup: Callable[[str], Callable[..., Any]]) -> None:
    """A scenario module's ``__main__``: ``NAME JSON`` prints ``RESULT <json>``;
    ``--many JSON`` (a list of ``[label, name, kwargs]``) prints ``RESULT [label, json]``
    or ``FAILED [label, traceback]`` for each, in order."""
    name, kwargs = sys.argv[1], json.loads(sys.argv[2])
    if name != MANY:
        result = lookup(name)(**kwargs)
        print("RESULT " + json.dumps(result), flush=True)
        return
    for label, scenario, arguments in kwargs:
        try:
            result = lookup(scenario)(**arguments)
        except Exception:
            print("FAILED " + json.dumps([label, traceback.format_exc()]), flush=True)
        else:
            print("RESULT " + json.dumps([label, result]), flush=True)


def _in_namespace(
    module: str, name: str, arguments: str, env: dict[str, str] | None, unset: tuple[str, ...]
) -> tuple[list[str], dict[str, str]]:
    """The command running ``python -m module name ARGUMENTS`` in a network namespace of
    its own (loopback up), and its environment: the cpu platform, passive OpenMP, ``env``
    added, ``unset`` removed."""
    shell = f"ip link set lo up && exec {sys.executable} -m {module} {name} " + _quote(arguments)
    environ = {
        **os.environ,
        "VLLM_TARGET_DEVICE": "cpu",
        "OMP_WAIT_POLICY": "PASSIVE",
        **(env or {}),
    }
    for variable in unset:
        environ.pop(variable, None)
    return ["unshare", "-n", "sh", "-c", shell], environ


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def segments() -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(SEGMENT_PREFIX))


def alive(pid: int) -> bool:
    """True while ``pid`` exists, running or a zombie nobody reaped."""
    return Path(f"/proc/{pid}").exists()


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, but for Python's shared-memory resource
    tracker (it unlinks the ring should this process be killed; it exits with it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmdline:
            found.append(int(entry.name))
    return found


# -- scenarios --------------------------------------------------------------------------------


def _greedy(llm: Any, max_tokens: int) -> dict[str, Any]:
    from kvrun import SamplingParams

    params = SamplingParams(
        max_tokens=max_tokens, temperature=0.0, logprobs=2, prompt_logprobs=1, ignore_eos=True
    )
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    tokens, top2, texts, prompt = [], [], [], []
    for out in outs:
        # each prompt token's own logprob (the first has none)
        prompt.append(
            [e[t].logprob for t, e in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])]
        )
        completion = out.outputs[0]
        tokens.append(list(completion.token_ids))
        texts.append(completion.text)
        # per position: the two best (token, logprob), best first
        top2.append(
            [
                sorted(((t, lp.logprob) for t, lp in entry.items()), key=lambda x: -x[1])[:2]
                for entry in completion.logprobs
            ]
        )
    return {"tokens": tokens, "top2": top2, "texts": texts, "prompt_logprobs": prompt}


def parity(model: str, configs: list[dict[str, Any]], max_tokens: int = 12) -> dict[str, Any]:
    """Greedy tokens and top-2 logprobs, and embeddings, under each engine config."""
    import torch

    from kvrun import LLM

    torch.set_num_threads(1)  # no OpenMP pool here: workers start by fork
    results: dict[str, Any] = {}
    for config in configs:
        label = config.pop("label")
        method = config.pop("method", None)
        if method is not None:
            os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = method
        llm = LLM(model, dtype="float32", num_kv_blocks=64, max_model_len=128, **config)
        result = _greedy(llm, max_tokens)
        result["embeddings"] = [o.outputs.embedding for o in llm.embed(PROMPTS, use_tqdm=False)]
        runner: Any = llm.llm_engine.runner
        result["runner"] = type(runner).__name__
        if hasattr(runner, "close"):
            result["pids"] = runner.pids
            result["started_by"] = runner.settings.start_method
            runner.close()
            result["alive_after_close"] = [p for p in result["pids"] if alive(p)]
        results[label] = result
        os.environ.pop("VLLM_WORKER_MULTIPROC_METHOD", None)
    results["segments_left"] = segments()
    return results


def result_area(model: str, batch: int = 16) -> dict[str, Any]:
    """A prefill and a decode step of ``batch`` requests through the mp executor (TP=1)
    and the in-process runner, same chunks: where the mp logits live, how far they are
    from uni's, and what is left once the executor is closed."""
    import gc

    import torch

    from kvrun import LLM
    from kvrun.scheduling.output import ScheduledChunk

    torch.set_num_threads(1)
    options: dict[str, Any] = {"dtype": "float32", "num_kv_blocks": 64, "max_model_len": 128}
    mp = LLM(model, distributed_executor_backend="mp", max_num_seqs=batch, **options)
    uni = LLM(model, **options)
    prompts = [[(11 * i + j) % 1000 + 3 for j in range(5 + i % 7)] for i in range(batch)]
    prefill = [
        ScheduledChunk(request_id=f"r{i}", token_ids=p, start_position=0, block_ids=[1 + i],
                       samples=True, is_prefill=True)
        for i, p in enumerate(prompts)
    ]  # fmt: skip
    decode = [
        ScheduledChunk(request_id=f"r{i}", token_ids=[7 + i], start_position=len(p),
                       block_ids=[1 + i], samples=True, is_prefill=False)
        for i, p in enumerate(prompts)
    ]  # fmt: skip
    runner: Any = mp.llm_engine.runner
    area_bytes = runner.settings.result_area_bytes
    out: dict[str, Any] = {"area_bytes": area_bytes, "steps": []}
    for chunks in (prefill, decode):
        got = runner.execute(chunks)
        want = uni.llm_engine.runner.execute(chunks)
        out["steps"].append(
            {
                "shape": list(got.logits.shape),
                "dtype": str(got.logits.dtype),
                "request_ids": got.request_ids == want.request_ids,
                "max_abs_diff": float((got.logits - want.logits).abs().max()),
                "equal": bool(torch.equal(got.logits, want.logits)),
                # a view of the area (its whole mapping is the storage), not a copy
                "storage_bytes": got.logits.untyped_storage().nbytes(),
            }
        )
        del got
    pids = list(runner.pids)
    out["driver_maps_area"] = "kvrun_mp_result" in Path(f"/proc/{pids[0]}/maps").read_text()
    runner.close()
    gc.collect()
    out["alive_after_close"] = [p for p in pids if alive(p)]
    out["children"] = children(os.getpid())
    out["segments_left"] = segments()
    out["area_still_mapped"] = "kvrun_mp_result" in Path("/proc/self/maps").read_text()
    return out


def kill_worker(model: str, tensor_parallel_size: int, victim: int) -> dict[str, Any]:
    """kill -9 one worker while requests run: what the engine raises, and how soon."""
    import torch

    from kvrun import LLM, SamplingParams
    from kvrun.engine.llm_engine import LLMEngine

    torch.set_num_threads(1)
    llm = LLM(
        model,
        dtype="float32",
        num_kv_blocks=64,
        max_model_len=128,
        tensor_parallel_size=tensor_parallel_size,
        distributed_executor_backend="mp",
    )
    engine: LLMEngine = llm.llm_engine
    runner: Any = engine.runner
    pids, segment = list(runner.pids), runner.segment_name
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, params)
    for _ in range(3):
        engine.step()
    os.kill(pids[victim], signal.SIGKILL)
    killed = time.monotonic()
    error = None
    try:
        while engine.has_unfinished_requests():
            engine.step()
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    elapsed = time.monotonic() - killed
    later = None
    try:  # the executor stays dead (the engine loop above it is not reusable either)
        runner.execute([])
    except Exception as exc:
        later = f"{type(exc).__name__}: {exc}"
    return {
        "pids": pids,
        "error": error,
        "seconds": elapsed,
        "later": later,
        "alive": [p for p in pids if alive(p)],
        "children": children(os.getpid()),
        "segment": segment,
        "segments_left": segments(),
    }


def start_failure(model: str, **kwargs: Any) -> dict[str, Any]:
    """An engine whose workers fail to start: the error, and what is left behind."""
    import torch

    from kvrun import LLM

    torch.set_num_threads(1)
    error = None
    started = time.monotonic()
    try:
        LLM(model, dtype="float32", max_model_len=128, distributed_executor_backend="mp", **kwargs)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    return {
        "error": error,
        "seconds": time.monotonic() - started,
        "children": children(os.getpid()),
        "segments_left": segments(),
    }


def built_in_a_thread(model: str) -> dict[str, Any]:
    """An engine built by a thread that then ends, used from the main thread."""
    import torch

    from kvrun import LLM

    torch.set_num_threads(1)
    built: list[Any] = []
    thread = threading.Thread(
        target=lambda: built.append(
            LLM(model, dtype="float32", num_kv_blocks=64, max_model_len=128,
                distributed_executor_backend="mp")
        )
    )  # fmt: skip
    thread.start()
    thread.join()
    time.sleep(1.0)  # past the workers' parent poll: they must still be there
    result = _greedy(built[0], 4)
    runner: Any = built[0].llm_engine.runner
    runner.close()
    return {"tokens": result["tokens"]}


def hold(model: str) -> None:
    """An engine on the mp executor that prints its workers' pids and waits to be killed."""
    import torch

    from kvrun import LLM

    torch.set_num_threads(1)
    llm = LLM(model, dtype="float32", num_kv_blocks=64, max_model_len=128,
              distributed_executor_backend="mp")  # fmt: skip
    runner: Any = llm.llm_engine.runner
    print("HOLD " + json.dumps({"pids": runner.pids, "segment": runner.segment_name}), flush=True)
    time.sleep(600)


def parent_killed(model: str, sig: int) -> dict[str, Any]:
    """Kill (``sig``) a process whose engine runs workers: do they go, and the ring?"""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.executor.scenarios", "hold", json.dumps({"model": model})],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    held = None
    for line in proc.stdout:
        if line.startswith("HOLD "):
            held = json.loads(line[len("HOLD ") :])
            break
    assert held is not None, "the engine did not start"
    alive_before = [p for p in held["pids"] if alive(p)]
    proc.send_signal(sig)
    proc.wait(30)
    _wait(lambda: not any(alive(p) for p in held["pids"]), 30)
    _wait(lambda: held["segment"] not in segments(), 30)  # the resource tracker unlinks it
    return {
        "alive_before": alive_before,
        "alive_after": [p for p in held["pids"] if alive(p)],
        "segment_left": held["segment"] in segments(),
    }


def serve(model: str, workdir: str, max_tokens: int) -> dict[str, Any]:
    """`kvrun serve -tp 2`: an openai client's greedy completion, then a worker killed."""
    import httpx

    from tests.server.conftest import launch

    server = launch(
        Path(workdir),
        args=[model, "-tp", "2", "--dtype", "float32", "--num-kv-blocks", "64",
              "--max-model-len", "128"],
        env={"VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1"},
    )  # fmt: skip
    out: dict[str, Any] = {}
    try:
        engine = server.engine_pid()
        workers = children(engine)
        out["workers"] = workers
        completion = server.client().completions.create(
            model=model, prompt=PROMPTS[0], max_tokens=max_tokens, temperature=0.0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        out["finish_reason"] = completion.choices[0].finish_reason
        out["text"] = completion.choices[0].text
        results: list[Any] = []

        def long_request() -> None:
            with server.http(timeout=120) as http:
                body = {"prompt": PROMPTS[1], "max_tokens": 110, "ignore_eos": True}
                answer = http.post("/v1/completions", json=body)
                results.append((answer.status_code, answer.text))

        thread = threading.Thread(target=long_request)
        thread.start()
        _wait(lambda: server.metrics().get("vllm:num_requests_running") == 1, 120)
        os.kill(workers[-1], signal.SIGKILL)
        thread.join(120)
        out["in_flight"] = results[0] if results else None
        out["health"] = httpx.get(server.base_url + "/health", timeout=10).status_code
        _wait(lambda: not any(alive(p) for p in workers), 30)
        out["workers_alive"] = [p for p in workers if alive(p)]
        out["exit"] = server.stop()
    finally:
        out["log_tail"] = server.log()[-3000:]
        server.cleanup()
    out["segments_left"] = segments()
    return out


def serve_sigterm(model: str, workdir: str, max_tokens: int) -> dict[str, Any]:
    """`kvrun serve -pp 2`: a completion, then SIGTERM: every worker must go."""
    from tests.server.conftest import launch

    server = launch(
        Path(workdir),
        args=[model, "-pp", "2", "--dtype", "float32", "--num-kv-blocks", "64",
              "--max-model-len", "128"],
    )  # fmt: skip
    out: dict[str, Any] = {}
    try:
        workers = children(server.engine_pid())
        out["workers"] = workers
        completion = server.client().completions.create(
            model=model, prompt=PROMPTS[0], max_tokens=max_tokens, temperature=0.0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        out["text"] = completion.choices[0].text
        out["exit"] = server.stop()
        _wait(lambda: not any(alive(p) for p in workers), 30)
        out["workers_alive"] = [p for p in workers if alive(p)]
        out["log_tail"] = server.log()[-3000:]
    finally:
        server.cleanup()
    out["segments_left"] = segments()
    return out


def _wait(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)


SCENARIOS: dict[str, Callable[..., Any]] = {
    "parity": parity,
    "kill_worker": kill_worker,
    "result_area": result_area,
    "start_failure": start_failure,
    "serve": serve,
    "serve_sigterm": serve_sigterm,
    "hold": hold,
    "built_in_a_thread": built_in_a_thread,
    "parent_killed": parent_killed,
}

if __name__ == "__main__":
    scenario_main(SCENARIOS.__getitem__)  # hold() never returns
