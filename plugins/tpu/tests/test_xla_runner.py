"""The core's model through XLA on PJRT's CPU device: parity, compile counts, compile cache.

These run only where torch_xla is installed (`nox -s tpu` builds that environment,
with PJRT_DEVICE=CPU); the default venv skips them with that instruction.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from kvrun.attention.base import AttentionLayerSpec
from kvrun.attention.reference import ReferenceAttention
from kvrun.config import EngineConfig
from kvrun.engine.executor_runner import ExecutorRunner
from kvrun.engine.model_runner import ModelRunner
from kvrun.envs import read_env
from kvrun.errors import ConfigError, PluginError
from kvrun.loader import load_checkpoint
from kvrun.models.config import ModelConfig
from kvrun.models.llama import LlamaForCausalLM
from kvrun.ops import reference_ops
from kvrun.platforms import KVCachePlan, KVCacheRequest, Unavailable
from kvrun.scheduling.output import ScheduledChunk
from kvrun.scheduling.request import Request
from kvrun.scheduling.scheduler import Scheduler, SchedulerConfig
from kvrun.testing.checkpoints import build_random_checkpoint
from kvrun_tpu.buckets import BucketSpec

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch_xla") is None,
    reason="torch_xla is not installed; run `nox -s tpu`",
)

BLOCK_SIZE = 8
NUM_BLOCKS = 24
LIMITS = SchedulerConfig(
    max_num_seqs=4,
    max_num_batched_tokens=32,  # small: long prompts are chunked beside running decodes
    max_model_len=64,
    block_size=BLOCK_SIZE,
    num_blocks=NUM_BLOCKS,
)
BUCKETS = BucketSpec(
    max_num_batched_tokens=LIMITS.max_num_batched_tokens,
    max_num_seqs=LIMITS.max_num_seqs,
    max_model_len=LIMITS.max_model_len,
    block_size=BLOCK_SIZE,
)
VOCAB = 512


@dataclass
class Setup:
    platform: object  # kvrun_tpu.platform.TpuPlatform
    reference: ModelRunner
    xla: object  # kvrun_tpu.runner.XlaModelRunner
    warm_up_graphs: int
    cache_dir: Path
    checkpoint: Path


def _model(path: Path, attention: object, device: torch.device) -> LlamaForCausalLM:
    checkpoint = load_checkpoint(str(path), hf_hub_offline=True, use_modelscope=False)
    config = ModelConfig.from_hf(checkpoint.hf_config, checkpoint.source)
    model = LlamaForCausalLM(config, reference_ops(), attention, torch.float32, device)  # type: ignore[arg-type]
    model.load_weights(checkpoint.iter_weights(torch.float32), checkpoint.source)
    return model


SPEC = AttentionLayerSpec(num_heads=4, num_kv_heads=2, head_dim=16, scale=16**-0.5)


def xla_runner(platform: Any, path: Path) -> tuple[Any, int]:
    """The tiny model on the XLA device, its runner warmed up over every bucket, and the
    graphs the warm-up compiled."""
    from kvrun_tpu.runner import XlaModelRunner

    attention = platform.attention_backend(None, SPEC)
    model = _model(path, attention, platform.device)
    shape = attention.kv_cache_shape(NUM_BLOCKS, BLOCK_SIZE, 2, 16)
    plan = KVCachePlan(NUM_BLOCKS, BLOCK_SIZE, torch.float32, shape, 2, 0, "test")
    caches = platform.allocate_kv_cache(plan, 2)
    runner = XlaModelRunner(model, caches, BUCKETS, NUM_BLOCKS, platform.device, True)
    return runner, runner.warm_up()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, xla_cache_dir: Path) -> Setup:
    from kvrun_tpu.platform import TpuPlatform

    root = tmp_path_factory.mktemp("model")
    # conftest's session fixture set the process's compile cache up with this path.
    platform = TpuPlatform(read_env({"VLLM_XLA_CACHE_PATH": str(xla_cache_dir)}))
    path = build_random_checkpoint(
        "llama", root / "ckpt", vocab_size=VOCAB, init_std=0.2, tokenizer_dir=root
    )
    ref_model = _model(path, ReferenceAttention(SPEC), torch.device("cpu"))
    ref_shape = ReferenceAttention.kv_cache_shape(NUM_BLOCKS, BLOCK_SIZE, 2, 16)
    reference = ModelRunner(
        ref_model, [torch.zeros(ref_shape) for _ in range(2)], BLOCK_SIZE, torch.device("cpu")
    )
    xla, graphs = xla_runner(platform, path)
    return Setup(platform, reference, xla, graphs, xla_cache_dir, path)


def greedy(
    runner: object, scheduler: Scheduler, prompts: dict[str, list[int]], max_tokens: int
) -> tuple[dict[str, list[int]], list[torch.Tensor], list[int]]:
    """Greedy outputs by request, every step's logits, and every step's (tokens) size."""
    for rid, prompt in prompts.items():
        scheduler.add_request(Request(rid, prompt, max_tokens=max_tokens))
    outputs: dict[str, list[int]] = {rid: [] for rid in prompts}
    all_logits: list[torch.Tensor] = []
    sizes: list[int] = []
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        step = runner.execute(out.chunks)  # type: ignore[attr-defined]
        tokens = step.logits.argmax(dim=-1).tolist()
        all_logits.append(step.logits)
        sizes.append(out.num_batched_tokens)
        sampled = {rid: [tok] for rid, tok in zip(step.request_ids, tokens)}
        for rid, tok in sampled.items():
            outputs[rid] += tok
        scheduler.update(out, sampled)
    return outputs, all_logits, sizes


def _prompts(seed: int, lengths: Sequence[int], prefix: list[int]) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"r{seed}-{i}": prefix + torch.randint(3, VOCAB, (n,), generator=g).tolist()
        for i, n in enumerate(lengths)
    }


def test_warm_up_compiles_one_graph_per_bucket(setup: Setup) -> None:
    assert BUCKETS.shapes() == [(16, 1), (16, 2), (16, 4), (32, 1), (32, 2), (32, 4)]
    assert setup.warm_up_graphs == len(BUCKETS.shapes()) + 1  # + the one-off first step


def test_greedy_parity_mixed_batches_and_prefix_hits_without_recompiling(setup: Setup) -> None:
    from kvrun_tpu.runner import compile_count

    before = compile_count()
    shared = list(range(100, 116))  # two full blocks: a prefix-cache hit for later requests
    first = _prompts(1, [21, 5, 30], [])
    second = _prompts(2, [3, 11], shared)
    runs = []
    for runner in (setup.reference, setup.xla):
        scheduler = Scheduler(LIMITS)
        a = greedy(runner, scheduler, first | {"warm": [*shared, 7]}, max_tokens=6)
        b = greedy(runner, scheduler, second, max_tokens=8)
        runs.append((a, b, scheduler.stats.prefix_cache_hits))
    (ref_a, ref_b, ref_hits), (xla_a, xla_b, xla_hits) = runs
    assert xla_a[0] == ref_a[0] and xla_b[0] == ref_b[0]
    assert ref_hits == xla_hits == 32  # both second-wave requests reuse the 16 shared tokens
    # Prompts of 21, 5, 30 and 17 tokens in a 32-token budget: 21 + 5 + 6 of the third;
    # two decodes + its last 24 + 6 of the fourth; three decodes + the fourth's last 11;
    # then four decodes a step.
    assert ref_a[2] == xla_a[2] and ref_a[2][:4] == [32, 32, 14, 4]
    assert all(len(tokens) == 6 for tokens in xla_a[0].values())
    for ref, got in zip(ref_a[1] + ref_b[1], xla_a[1] + xla_b[1]):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert compile_count() == before  # new lengths inside the buckets: nothing compiled


def test_prompt_logits_graph_is_reported_after_warm_up_and_matches(setup: Setup) -> None:
    from kvrun_tpu.runner import XlaModelRunner

    # Prompt logprobs need every row's logits: a graph warm-up did not compile.
    chunk = ScheduledChunk("p", [5, 6, 7], 0, [3], samples=True, is_prefill=True)
    with pytest.raises(PluginError) as raised:
        setup.xla.execute([chunk], frozenset({"p"}))  # type: ignore[attr-defined]
    assert str(raised.value) == (
        "VLLM_XLA_CHECK_RECOMPILATION: a step of 3 tokens and 1 requests (bucket 16 tokens "
        "x 1 requests) compiled 1 new graph(s) after warm-up"
    )
    xla = setup.xla
    unchecked = XlaModelRunner(
        xla.model,
        xla.kv_caches,
        BUCKETS,
        NUM_BLOCKS,
        xla.device,  # type: ignore[attr-defined]
    )
    got = unchecked.execute([chunk], frozenset({"p"}))
    want = setup.reference.execute([chunk], frozenset({"p"}))
    assert (got.request_ids, list(got.prompt_logits)) == (["p"], ["p"])
    assert got.prompt_logits["p"].shape == (3, VOCAB)
    torch.testing.assert_close(
        got.prompt_logits["p"], want.prompt_logits["p"], rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)


# A second engine start in a fresh process: the same model set-up and warm-up.
_SECOND_START = """
import json, sys
sys.path.insert(0, {tests!r})
import torch_xla.debug.metrics as met
from kvrun.envs import read_env
from kvrun_tpu.platform import TpuPlatform
from kvrun_tpu.runner import compile_count
from test_xla_runner import xla_runner
platform = TpuPlatform(read_env({{"VLLM_XLA_CACHE_PATH": {cache!r}}}))
platform.setup_process()
xla_runner(platform, {ckpt!r})
names = ("PersistentCacheHit", "PersistentCacheMiss", "PersistentCacheDeserializeFailure")
print(json.dumps([compile_count(), *(met.counter_value(n) or 0 for n in names)]))
"""


def test_graphs_are_stored_in_and_found_in_the_persistent_cache(setup: Setup) -> None:
    from kvrun_tpu.runner import compile_count

    # Every graph this process compiled is a file under VLLM_XLA_CACHE_PATH.
    assert len(list(setup.cache_dir.iterdir())) == compile_count()
    code = _SECOND_START.format(
        tests=str(Path(__file__).parent), cache=str(setup.cache_dir), ckpt=str(setup.checkpoint)
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    compiles, hits, misses, failures = json.loads(done.stdout.strip().splitlines()[-1])
    # The second process finds each of its graphs (model set-up + warm-up) on disk: no
    # misses. PJRT's CPU client cannot deserialize executables ("UNIMPLEMENTED"), so
    # here it compiles them again; on a TPU they load (hits) and nothing compiles.
    graphs = setup.warm_up_graphs + 1
    assert (compiles, hits, misses, failures) == (graphs, 0, 0, graphs)


def test_platform_on_the_pjrt_cpu_device(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    from kvrun_tpu import probe
    from kvrun_tpu.attention import XlaPagedAttention

    platform = setup.platform
    assert probe() == Unavailable(
        "torch_xla 2.9.0 runs on PJRT device 'CPU', not a TPU (no TPU chip, or libtpu missing)"
    )
    assert platform.describe() == "tpu (PJRT device CPU)"  # type: ignore[attr-defined]
    assert dict(platform.attention_backends()) == {"XLA_PAGED": XlaPagedAttention}  # type: ignore[attr-defined]
    spec = AttentionLayerSpec(num_heads=4, num_kv_heads=2, head_dim=16, scale=0.25)
    with pytest.raises(ConfigError) as raised:
        platform.attention_backend("PALLAS", spec)  # type: ignore[attr-defined]
    assert str(raised.value) == (
        "VLLM_ATTENTION_BACKEND='PALLAS' is not offered by the tpu platform; "
        "valid backends are: XLA_PAGED"
    )
    request = KVCacheRequest(2, 2, 16, BLOCK_SIZE, torch.float32, 64, lambda n: (n,))
    with pytest.raises(PluginError) as raised:
        platform.plan_kv_cache(request)  # type: ignore[attr-defined]
    assert str(raised.value) == (
        "the tpu platform cannot size the KV cache: torch_xla reports no memory for PJRT "
        "device 'CPU' (Bad StatusOr access: UNIMPLEMENTED: GetAllocatorStats is not "
        "supported); set num_kv_blocks (--num-kv-blocks)"
    )
    # XLA fixed its compile cache at the first graph; a second set-up says so.
    with caplog.at_level(logging.WARNING, logger="kvrun_tpu.platform"):
        platform.setup_process()  # type: ignore[attr-defined]
    assert caplog.messages == [
        f"XLA computed before set-up; VLLM_XLA_CACHE_PATH={setup.cache_dir} not applied"
    ]


def _engine_config(model_source: str) -> EngineConfig:
    return EngineConfig(
        model_source=model_source,
        model_name="m",
        architecture="LlamaForCausalLM",
        dtype=torch.float32,
        max_model_len=LIMITS.max_model_len,
        vocab_size=VOCAB,
        block_size=BLOCK_SIZE,
        max_num_seqs=LIMITS.max_num_seqs,
        max_num_batched_tokens=LIMITS.max_num_batched_tokens,
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        seed=0,
        max_logprobs=20,
        platform_name="tpu",
        attention_backend="XLA_PAGED",
        num_kv_blocks=NUM_BLOCKS,
    )


def test_platform_builds_the_runner_from_the_engine_config(setup: Setup) -> None:
    xla = setup.xla
    runner = setup.platform.make_runner(xla.model, xla.kv_caches, _engine_config("m"))  # type: ignore[attr-defined]
    assert (runner.buckets, runner.num_blocks, runner.check_recompilation) == (
        BUCKETS,
        NUM_BLOCKS,
        False,  # VLLM_XLA_CHECK_RECOMPILATION is not registered in kvrun.envs yet
    )


def test_the_engine_drives_the_model_executor_with_parity(setup: Setup) -> None:
    from kvrun_tpu.runner import compile_count

    platform: Any = setup.platform
    executor = platform.model_executor(_engine_config(str(setup.checkpoint)))
    plan = executor.init_kv_cache(NUM_BLOCKS, LIMITS.max_model_len)
    assert (plan.num_blocks, plan.layer_shape) == (NUM_BLOCKS, (NUM_BLOCKS + 1, 8, 4, 16))
    before = compile_count()
    # The core runner as the engine builds it for an executor (kvrun.engine.builder).
    runner = ExecutorRunner(executor, platform.device)
    prompts = _prompts(3, [19, 2, 40], [])
    want = greedy(setup.reference, Scheduler(LIMITS), prompts, max_tokens=5)
    got = greedy(runner, Scheduler(LIMITS), prompts, max_tokens=5)
    assert got[0] == want[0] and got[2] == want[2]
    for ref, out in zip(want[1], got[1]):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # A second model of the same shapes reuses the first one's graphs.
    assert compile_count() == before
