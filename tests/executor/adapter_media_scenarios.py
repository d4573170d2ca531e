"""Runs of LoRA adapters and media inputs through the executors for
tests/executor/test_executor_lora_media.py, each in a process of its own inside a
loopback-only network namespace (as tests/executor/scenarios.py; gloo and Ray would
otherwise pick the machine's outward address).

``python -m tests.executor.adapter_media_scenarios NAME JSON`` prints ``RESULT <json>``;
:func:`run_many` runs several scenarios in one such process.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tests.executor.ray_scenarios import ray_environ
from tests.executor.scenarios import (
    ScenarioResults,
    alive,
    run_scenario,
    run_scenarios,
    scenario_main,
    segments,
)

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 200, 300], [1, 4, 9, 16, 25, 36, 49, 64, 81, 100]]
IMAGE_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>Describe this picture"
TEXT_PROMPT = "A plain question without any picture"


def run(name: str, timeout_s: float = 300, **kwargs: Any) -> Any:
    return run_scenario("tests.executor.adapter_media_scenarios", name, timeout_s, **kwargs)


def run_many(scenarios: list[tuple[str, str, dict[str, Any]]], timeout_s: float) -> ScenarioResults:
    """``(label, name, kwargs)`` scenarios in order in one process (with Ray's settings
    of tests/executor/ray_scenarios.py, no cluster to join); each result by its label."""
    return run_scenarios(
        "tests.executor.adapter_media_scenarios",
        scenarios,
        timeout_s,
        ray_environ(),
        ("RAY_ADDRESS",),
    )


def _segments_of(pid: int) -> list[str]:
    """The executor's shared-memory rings left by the engine in process ``pid`` (other
    programs on this machine may hold rings of their own meanwhile)."""
    return [name for name in segments() if name.startswith(f"kvrun_mp_{pid}_")]


def _outputs(outs: list[Any]) -> dict[str, Any]:
    """Greedy tokens, the two best (token, logprob) per position, prefix-cache hits."""
    tokens, top2, cached = [], [], []
    for out in outs:
        completion = out.outputs[0]
        tokens.append(list(completion.token_ids))
        top2.append(
            [
                sorted(((t, lp.logprob) for t, lp in entry.items()), key=lambda x: -x[1])[:2]
                for entry in completion.logprobs
            ]
        )
        cached.append(out.num_cached_tokens or 0)
    return {"tokens": tokens, "top2": top2, "cached": cached}


def _close(llm: Any, result: dict[str, Any]) -> None:
    runner: Any = llm.llm_engine.runner
    result["runner"] = type(runner).__name__
    if hasattr(runner, "close"):
        pids = list(getattr(runner, "pids", []))
        runner.close()
        result["alive_after_close"] = [p for p in pids if alive(p)]


def lora(
    model: str, adapters: dict[str, str], configs: list[dict[str, Any]], max_tokens: int = 8
) -> dict[str, Any]:
    """Each prompt with each adapter and with none, all in one batch, twice (the second
    time from the prefix cache), under each engine config; more adapters than slots."""
    import torch

    from kvrun import LLM, LoRARequest, SamplingParams

    torch.set_num_threads(1)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=2, ignore_eos=True)
    requests = [LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())]
    choices: list[Any] = [None, *requests]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS for _ in choices]
    loras = [c for _ in PROMPTS for c in choices]
    results: dict[str, Any] = {}
    for config in configs:
        label = config.pop("label")
        llm = LLM(
            model,
            dtype="float32",
            num_kv_blocks=96,
            max_model_len=128,
            block_size=8,
            enable_lora=True,
            max_loras=2,
            max_lora_rank=8,
            **config,
        )
        first = _outputs(llm.generate(prompts, params, use_tqdm=False, lora_request=loras))
        again = _outputs(llm.generate(prompts, params, use_tqdm=False, lora_request=loras))
        result = {**first, "again": again}
        # the engine's side reads each adapter once to check it; the ranks read them too
        engine_lora: Any = llm.llm_engine.lora
        result["engine_reads"] = engine_lora.num_reads
        result["loras"] = sorted(llm.llm_engine.list_loras())
        _close(llm, result)
        results[label] = result
    results["segments_left"] = _segments_of(os.getpid())
    return results


def lora_ray(
    model: str, adapters: dict[str, str], configs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """:func:`lora` under ``configs`` (default: in-process and through one Ray actor of a
    local cluster kvrun starts, and stops at close); the Ray processes left afterwards."""
    from tests.executor.ray_scenarios import _wait_gone
    from tests.support.ray_cluster import processes_with_environ

    tmpdir = tempfile.mkdtemp(prefix="kvray", dir="/tmp")
    os.environ["RAY_TMPDIR"] = tmpdir
    try:
        if configs is None:
            configs = [
                {"label": "uni"},
                {"label": "ray-tp1", "distributed_executor_backend": "ray"},
            ]
        out = lora(model, adapters, configs)
        left = [_cmdline(p) for p in _wait_gone(processes_with_environ(f"RAY_TMPDIR={tmpdir}"))]
        # but Python's resource tracker, this process's child, which exits with it
        out["ray_processes_left"] = [c for c in left if "resource_tracker" not in c]
    finally:
        os.environ.pop("RAY_TMPDIR", None)
        shutil.rmtree(tmpdir, ignore_errors=True)
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            text = f.read().replace(b"\0", b" ").decode(errors="replace")
        return f"{pid}: {text[:200]}"
    except OSError:
        return f"{pid}: gone"


def serve_runtime_lora(model: str, adapter: str, workdir: str, max_tokens: int) -> dict[str, Any]:
    """`kvrun serve --distributed-executor-backend mp --enable-lora`: an adapter loaded at
    run time (VLLM_ALLOW_RUNTIME_LORA_UPDATING=1) answers as the in-process engine does
    with it; unloaded it is gone; loaded again under another name it answers alike."""
    import torch

    from kvrun import LLM, LoRARequest, SamplingParams
    from tests.executor.scenarios import children
    from tests.server.conftest import launch

    torch.set_num_threads(1)
    allowed = Path(workdir) / "allowed"
    shutil.copytree(adapter, allowed / "runtime")
    server = launch(
        Path(workdir),
        args=[model, "--served-model-name", "base", "--distributed-executor-backend", "mp",
              "--dtype", "float32", "--num-kv-blocks", "64", "--max-model-len", "128",
              "--enable-lora", "--max-lora-rank", "8", "--allowed-lora-paths", str(allowed)],
        # a loaded machine may take longer than the default 10 s to start the workers
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_RPC_TIMEOUT": "120000"},
    )  # fmt: skip
    out: dict[str, Any] = {}

    def complete(name: str) -> tuple[int, str]:
        body = {"model": name, "prompt": PROMPTS[0], "max_tokens": max_tokens,
                "temperature": 0.0, "ignore_eos": True}  # fmt: skip
        with server.http() as http:
            answer = http.post("/v1/completions", json=body)
        if answer.status_code != 200:
            return answer.status_code, answer.text
        return 200, answer.json()["choices"][0]["text"]

    def post(path: str, body: dict[str, str]) -> int:
        with server.http() as http:
            return int(http.post(path, json=body).status_code)

    engine = server.engine_pid()
    try:
        out["workers"] = len(children(engine))
        target = str(allowed / "runtime")
        out["load"] = post("/v1/load_lora_adapter", {"lora_name": "rt", "lora_path": target})
        out["rt"] = complete("rt")
        out["base"] = complete("base")
        out["unload"] = post("/v1/unload_lora_adapter", {"lora_name": "rt"})
        out["rt_after_unload"] = complete("rt")[0]
        out["reload"] = post("/v1/load_lora_adapter", {"lora_name": "rt2", "lora_path": target})
        out["rt2"] = complete("rt2")
        out["exit"] = server.stop()
    finally:
        out["log_tail"] = server.log()[-3000:]
        server.cleanup()
    llm = LLM(model, dtype="float32", num_kv_blocks=64, max_model_len=128, enable_lora=True,
              max_lora_rank=8)  # fmt: skip
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    request = LoRARequest("rt", 1, adapter)
    for name, lora in (("uni_rt", request), ("uni_base", None)):
        [done] = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False,
                              lora_request=lora)  # fmt: skip
        out[name] = done.outputs[0].text
    out["segments_left"] = _segments_of(engine) + _segments_of(os.getpid())
    return out


def _image(seed: int, height: int = 56, width: int = 84) -> Any:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def media(model: str, configs: list[dict[str, Any]], max_tokens: int = 8) -> dict[str, Any]:
    """Two images, a text prompt and the first image again in one batch, prefills cut
    into chunks of 8 tokens (chunks inside an image, and chunks covering none of it)."""
    import torch

    from kvrun import LLM, SamplingParams

    torch.set_num_threads(1)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=2, ignore_eos=True)
    prompts: list[Any] = [
        {"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": _image(1)}},
        {"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": _image(2)}},
        TEXT_PROMPT,
        {"prompt": "Look: " + IMAGE_PROMPT, "multi_modal_data": {"image": _image(1)}},
    ]
    results: dict[str, Any] = {}
    for config in configs:
        label = config.pop("label")
        llm = LLM(
            model,
            dtype="float32",
            num_kv_blocks=64,
            max_model_len=128,
            enable_chunked_prefill=True,
            max_num_batched_tokens=8,
            max_num_seqs=4,
            **config,
        )
        outs = llm.generate(prompts, params, use_tqdm=False)
        result = _outputs(outs)
        result["prompt_lens"] = [len(o.prompt_token_ids) for o in outs]
        _close(llm, result)
        results[label] = result
    results["segments_left"] = _segments_of(os.getpid())
    return results


if __name__ == "__main__":
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    scenario_main(lambda name: globals()[name])
