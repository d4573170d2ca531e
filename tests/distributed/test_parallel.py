"""The shard arithmetic (which rank holds what), its refusals, and the rendezvous
address; in-process, no torch.distributed."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kvrun import envs
from kvrun.config import EngineArgs
from kvrun.distributed.parallel import (
    ParallelConfig,
    ShardLayout,
    check_heads,
    partition_layers,
    shard_weights,
)
from kvrun.distributed.state import find_free_port, init_method, rendezvous_address
from kvrun.distributed.worker import Worker, WorkerSpec, unsupported_reason
from kvrun.errors import ConfigError
from kvrun.models.config import ModelConfig
from kvrun.models.gemma import GemmaForCausalLM
from kvrun.models.llama import (
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MixtureOfExpertsForCausalLM,
    Qwen3ForCausalLM,
)


def _model(**fields: object) -> ModelConfig:
    base = ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=103,
        hidden_size=8,
        intermediate_size=12,
        num_layers=5,
        num_heads=4,
        num_kv_heads=2,
        head_dim=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attention_bias=True,
        sliding_window=None,
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def test_layers_split_evenly_with_the_remainder_on_the_earlier_stages() -> None:
    assert partition_layers(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert partition_layers(4, 2) == [(0, 2), (2, 4)]
    assert partition_layers(3, 1) == [(0, 3)]


def test_vllm_pp_layer_partition_sets_each_stage_s_layers() -> None:
    partition = envs.read_env({"VLLM_PP_LAYER_PARTITION": "1,3,1"}).VLLM_PP_LAYER_PARTITION
    assert partition_layers(5, 3, partition) == [(0, 1), (1, 4), (4, 5)]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2,3", "VLLM_PP_LAYER_PARTITION=2,3 has 2 entries, but pipeline_parallel_size is 3"),
        ("2,2,2", "VLLM_PP_LAYER_PARTITION=2,2,2 sums to 6, but the model has 5 layers"),
    ],
)
def test_a_partition_that_does_not_fit_is_refused_naming_both_numbers(
    value: str, message: str
) -> None:
    partition = envs.read_env({"VLLM_PP_LAYER_PARTITION": value}).VLLM_PP_LAYER_PARTITION
    with pytest.raises(ConfigError, match=message):
        partition_layers(5, 3, partition)
    with pytest.raises(ConfigError, match=message):  # the Worker's path
        ShardLayout.build(_model(), ParallelConfig(1, 3), 0, partition)


def test_a_malformed_partition_is_refused_when_the_environment_is_read() -> None:
    with pytest.raises(ConfigError, match="VLLM_PP_LAYER_PARTITION"):
        envs.read_env({"VLLM_PP_LAYER_PARTITION": "4,x"})
    with pytest.raises(ConfigError, match="VLLM_PP_LAYER_PARTITION"):
        envs.read_env({"VLLM_PP_LAYER_PARTITION": "4,0"})


def test_more_stages_than_layers_is_refused() -> None:
    with pytest.raises(ConfigError, match="pipeline_parallel_size=6 is more than the model's 5"):
        partition_layers(5, 6)


def test_heads_that_do_not_split_are_refused_naming_both_numbers() -> None:
    with pytest.raises(
        ConfigError, match="4 attention heads are not divisible by tensor_parallel_size=3"
    ):
        check_heads(4, 4, 3)
    with pytest.raises(ConfigError, match="6 KV heads and tensor_parallel_size=4"):
        check_heads(12, 6, 4)
    check_heads(8, 2, 4)  # replicated: 2 divides 4
    check_heads(8, 8, 4)  # split


def test_ranks_are_numbered_stage_major_and_the_driver_is_the_last_stage_s_first() -> None:
    parallel = ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=3)
    assert [parallel.coordinates(r) for r in range(6)] == [
        (0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)
    ]  # fmt: skip
    assert parallel.driver_rank == 4
    with pytest.raises(ConfigError, match="tensor_parallel_size=0 is not valid"):
        ParallelConfig(tensor_parallel_size=0)


def test_replicated_kv_heads_are_the_ones_each_rank_s_q_heads_read() -> None:
    model = _model(num_heads=8, num_kv_heads=2, head_dim=2)
    layouts = [ShardLayout.build(model, ParallelConfig(4, 1), r) for r in range(4)]
    group = model.num_heads // model.num_kv_heads  # q heads per kv head
    for layout in layouts:
        assert layout.kv_heads[1] - layout.kv_heads[0] == 1
        for q in range(*layout.q_heads):
            assert q // group == layout.kv_heads[0]
    assert [layout.kv_heads for layout in layouts] == [(0, 1), (0, 1), (1, 2), (1, 2)]


def _checkpoint(model: ModelConfig) -> dict[str, torch.Tensor]:
    """A random state dict of ``model``'s shapes (Hugging Face names)."""
    g = torch.Generator().manual_seed(0)
    h, d, i, v = model.hidden_size, model.head_dim, model.intermediate_size, model.vocab_size
    q, kv = model.num_heads * d, model.num_kv_heads * d
    state = {"model.embed_tokens.weight": torch.randn(v, h, generator=g)}
    state["lm_head.weight"] = torch.randn(v, h, generator=g)
    state["model.norm.weight"] = torch.randn(h, generator=g)
    for n in range(model.num_layers):
        p = f"model.layers.{n}."
        shapes = {
            "self_attn.q_proj.weight": (q, h), "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.weight": (kv, h), "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.weight": (kv, h), "self_attn.v_proj.bias": (kv,),
            "self_attn.o_proj.weight": (h, q),
            "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
            "mlp.down_proj.weight": (h, i),
            "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        }  # fmt: skip
        state.update({p + k: torch.randn(s, generator=g) for k, s in shapes.items()})
    return state


def test_the_ranks_slices_put_together_are_the_checkpoint() -> None:
    model = _model()
    state = _checkpoint(model)
    parallel = ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2)
    shards = {}
    for rank in range(4):
        layout = ShardLayout.build(model, parallel, rank)
        shards[rank] = (layout, dict(shard_weights(state.items(), layout, model)))
    # stage 0 holds layers 0-2 and the embedding; stage 1 layers 3-4, norm and lm_head
    stage0, stage1 = shards[0][1], shards[2][1]
    assert "model.norm.weight" not in stage0 and "lm_head.weight" not in stage0
    assert "model.embed_tokens.weight" not in stage1
    assert {k.split(".")[2] for k in stage0 if k.startswith("model.layers.")} == {"0", "1", "2"}
    assert {k.split(".")[2] for k in stage1 if k.startswith("model.layers.")} == {"0", "1"}
    # tensor-parallel halves: rows of column-parallel matrices, columns of row-parallel ones
    for stage, first_layer in ((0, 0), (1, 3)):
        a, b = shards[2 * stage][1], shards[2 * stage + 1][1]
        for local in range(2):
            p, g = f"model.layers.{local}.", f"model.layers.{first_layer + local}."
            for name in ("self_attn.q_proj.weight", "self_attn.k_proj.bias", "mlp.up_proj.weight"):
                assert torch.equal(torch.cat([a[p + name], b[p + name]]), state[g + name])
            for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
                assert torch.equal(torch.cat([a[p + name], b[p + name]], dim=1), state[g + name])
            assert torch.equal(a[p + "input_layernorm.weight"], state[g + "input_layernorm.weight"])
    # the vocabulary: 103 rows as 52 + 51, the last rank's padded with a zero row
    head = torch.cat([shards[2][1]["lm_head.weight"], shards[3][1]["lm_head.weight"]])
    assert head.shape[0] == 104
    assert torch.equal(head[:103], state["lm_head.weight"]) and not head[103].any()


def test_phi3_s_merged_weights_are_split_per_part() -> None:
    model = _model(num_kv_heads=4)
    q = model.num_heads * model.head_dim
    qkv = torch.arange(3 * q * 2, dtype=torch.float32).view(3 * q, 2)
    gate_up = torch.arange(2 * model.intermediate_size * 2, dtype=torch.float32).view(-1, 2)
    state = {
        "model.layers.0.self_attn.qkv_proj.weight": qkv,
        "model.layers.0.mlp.gate_up_proj.weight": gate_up,
    }
    halves = []
    for rank in range(2):
        layout = ShardLayout.build(model, ParallelConfig(2, 1), rank)
        halves.append(dict(shard_weights(state.items(), layout, model)))
    for name, whole, parts in (
        ("self_attn.qkv_proj.weight", qkv, 3),
        ("mlp.gate_up_proj.weight", gate_up, 2),
    ):
        a, b = (h[f"model.layers.0.{name}"] for h in halves)
        # each part (q, k, v / gate, up) is split in two, rank 0 taking the first halves
        for j, (pa, pb) in enumerate(zip(a.chunk(parts), b.chunk(parts), strict=True)):
            assert torch.equal(torch.cat([pa, pb]), whole.chunk(parts)[j])


def test_architectures_without_sharding_are_refused_by_name() -> None:
    from kvrun.models.deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

    tp2, pp2 = ParallelConfig(2, 1), ParallelConfig(1, 2)
    for cls in (
        LlamaForCausalLM,
        Qwen3ForCausalLM,
        MixtureOfExpertsForCausalLM,
        GemmaForCausalLM,
        DeepseekV2ForCausalLM,
        DeepseekV3ForCausalLM,
    ):
        assert unsupported_reason(cls, "X", tp2) is None
        assert unsupported_reason(cls, "X", pp2) is None
    for cls, arch in ((LlamaForSequenceClassification, "Qwen3ForSequenceClassification"),):
        assert unsupported_reason(cls, arch, tp2) == (
            f"architecture {arch} does not support tensor_parallel_size>1 (asked 2) yet"
        )
        assert unsupported_reason(cls, arch, pp2) == (
            f"architecture {arch} does not support pipeline_parallel_size>1 (asked 2) yet"
        )
        assert unsupported_reason(cls, arch, ParallelConfig(1, 1)) is None


def test_platforms_name_their_communicator_or_say_why_they_have_none() -> None:
    from kvrun_cpu.platform import CpuPlatform

    assert (CpuPlatform.dist_backend, CpuPlatform.parallel_unsupported) == ("gloo", "")
    openvino = pytest.importorskip("kvrun_openvino.platform")
    assert "OpenVINO runs the whole model" in openvino.OpenvinoPlatform.parallel_unsupported


def test_the_rendezvous_is_loopback_and_vllm_port_upward_by_default() -> None:
    host, port = rendezvous_address(envs.read_env({}))
    assert host == "127.0.0.1" and 0 < port < 65536
    assert init_method(host, port) == f"tcp://127.0.0.1:{port}"
    with socket.socket() as busy:  # VLLM_PORT taken: the next free port up
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        env = envs.read_env({"VLLM_PORT": str(taken), "VLLM_HOST_IP": "127.0.0.1"})
        host, port = rendezvous_address(env)
        assert host == "127.0.0.1" and taken < port < taken + 64
    assert find_free_port("127.0.0.1", None) > 0


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (root)")
def test_with_only_loopback_this_node_s_address_is_127_0_0_1() -> None:
    code = (
        "from kvrun import envs; from kvrun.distributed.state import node_ip; "
        "print(node_ip(envs.read_env({})), node_ip(envs.read_env({'VLLM_HOST_IP': '10.1.2.3'})))"
    )
    proc = subprocess.run(
        ["unshare", "-n", "sh", "-c", f'ip link set lo up && exec {sys.executable} -c "{code}"'],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (proc.returncode, proc.stdout) == (0, "127.0.0.1 10.1.2.3\n"), proc.stderr


def test_gloo_is_told_the_loopback_interface_for_a_loopback_rendezvous() -> None:
    from kvrun.distributed.state import interface_holding

    assert interface_holding("127.0.0.1") == "lo"
    assert interface_holding("192.0.2.1") is None  # TEST-NET-1: held by no interface here


def _spec(tp: int, local_rank: int = 0) -> WorkerSpec:
    return WorkerSpec(
        rank=0,
        local_rank=local_rank,
        tensor_parallel_size=tp,
        pipeline_parallel_size=1,
        init_method="tcp://127.0.0.1:1",
    )


def test_the_worker_s_local_rank_is_the_spec_s() -> None:
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "LOCAL_RANK": "5"}
    worker = Worker(EngineArgs(), env, _spec(1, local_rank=1))
    assert worker.env.LOCAL_RANK == 1


def test_a_platform_without_parallelism_refuses_more_than_one_rank() -> None:
    pytest.importorskip("openvino")
    env = {**os.environ, "VLLM_TARGET_DEVICE": "openvino"}
    with pytest.raises(ConfigError, match="the openvino platform does not support tensor/pipeline"):
        Worker(EngineArgs(), env, _spec(2))


def test_a_pipeline_stage_reads_only_its_own_tensors(
    random_checkpoint: Callable[..., Path],
) -> None:
    from kvrun.engine.builder import load_model_source

    path = random_checkpoint("llama", seed=3, num_layers=3, num_heads=4, num_kv_heads=2)
    checkpoint, model, _ = load_model_source(EngineArgs(model=str(path)), envs.read_env({}))
    layout = ShardLayout.build(model, ParallelConfig(1, 2), rank=1)  # stage 1: layer 2
    names = [
        name
        for name, _ in checkpoint.iter_weights(
            torch.float32, progress=False, select=lambda n: layout.wants(n, False)
        )
    ]
    assert "model.embed_tokens.weight" not in names
    assert {"model.norm.weight", "lm_head.weight"} <= set(names)
    assert {n.split(".")[2] for n in names if n.startswith("model.layers.")} == {"2"}
