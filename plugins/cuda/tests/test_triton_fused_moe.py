"""The Triton fused_moe (kvrun_cuda.triton.fused_moe) against the core's reference op: its
alignment step in torch and in Triton (VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON), the two
grouped GEMMs with SiLU-and-mul between and the routing weights, the experts stacked by
prepare_experts, and the model's chunking (VLLM_FUSED_MOE_CHUNK_SIZE) over it.

Each test runs in Triton's interpreter on CPU (small shapes: the interpreter runs a
program's Python) and again compiled on an NVIDIA GPU (``-m gpu``), which skips without
one. The interpreter runs fp32 and fp16 only: it gets bf16 wrong.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (Linux only)")

from kvrun.envs import read_env
from kvrun.models.config import ModelConfig
from kvrun.models.moe import MoeWeights, moe_mlp, prepare_mixture
from kvrun.ops import reference as ref
from kvrun.ops import reference_ops
from kvrun.testing.op_checks import OP_CASES, TOLERANCE, OpCase, check_op
from kvrun_cuda.platform import CudaPlatform
from kvrun_cuda.triton.fused_moe import (
    Alignment,
    align_block_size,
    fused_moe,
    max_tiles,
    moe_config,
    prepare_experts,
)
from kvrun_cuda.triton.ops import triton_ops

ALIGN = [False, True]
ALIGN_IDS = ["align-torch", "align-triton"]


def dtypes_for(device: torch.device) -> list[torch.dtype]:
    if device.type == "cuda":
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32, torch.float16]


def routing(
    tokens: int, experts: int, k: int, device: torch.device, seed: int, *, skew: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token, weights summing to 1 in float32; ``skew``: expert 0 in
    every token's choice (its group spans several tiles) and the last expert in none."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    if skew:
        pool = torch.arange(1, experts - 1)
        rest = torch.stack(
            [pool[torch.randperm(len(pool), generator=g)[: k - 1]] for _ in range(tokens)]
        )
        ids = torch.cat([torch.zeros(tokens, 1, dtype=torch.int64), rest], dim=1)
    weights = torch.rand(tokens, k, generator=g).softmax(dim=-1)
    return weights.to(device), ids.to(device)


def experts(
    num: int, hidden: int, inter: int, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w13 = [
        (0.2 * torch.randn(2 * inter, hidden, generator=g)).to(dtype).to(device) for _ in range(num)
    ]
    w2 = [(0.2 * torch.randn(hidden, inter, generator=g)).to(dtype).to(device) for _ in range(num)]
    return w13, w2


def check_alignment(a: Alignment, ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    """Every invariant :class:`Alignment` states, against a plain count of ``ids``."""
    flat = ids.reshape(-1).cpu()
    pairs = flat.numel()
    sorted_pairs = a.sorted_pairs.cpu().long()
    tile_experts = a.tile_experts.cpu().long()
    tiles = max_tiles(pairs, num_experts, block_m)
    assert sorted_pairs.shape == (tiles * block_m,) and tile_experts.shape == (tiles,)
    assert a.sorted_pairs.dtype == a.tile_experts.dtype == a.total.dtype == torch.int32
    start = 0
    for e in range(num_experts):
        mine = torch.nonzero(flat == e).squeeze(1)
        padded = -(-len(mine) // block_m) * block_m
        group = sorted_pairs[start : start + padded]
        # this expert's pairs, each once (in any order), then the sentinel
        assert torch.equal(group[: len(mine)].sort().values, mine), f"expert {e}"
        assert bool((group[len(mine) :] == pairs).all()), f"expert {e}'s padding"
        assert bool((tile_experts[start // block_m : (start + padded) // block_m] == e).all())
        start += padded
    assert int(a.total.item()) == start
    assert bool((sorted_pairs[start:] == pairs).all())
    assert bool((tile_experts[start // block_m :] == -1).all())


@pytest.mark.parametrize("in_triton", ALIGN, ids=ALIGN_IDS)
@pytest.mark.parametrize(
    ("tokens", "num_experts", "k", "block_m"),
    [
        (1, 8, 2, 16),  # decode: most experts empty, fewer pairs than experts
        (37, 4, 2, 16),  # every group several tiles long, most ending mid-tile
        (9, 5, 3, 64),  # one tile per expert, mostly padding
        (40, 60, 6, 16),  # experts not a power of two
    ],
)
def test_alignment(
    device: torch.device, in_triton: bool, tokens: int, num_experts: int, k: int, block_m: int
) -> None:
    _, ids = routing(tokens, num_experts, k, device, seed=tokens)
    check_alignment(
        align_block_size(ids, num_experts, block_m, in_triton=in_triton), ids, num_experts, block_m
    )


@pytest.mark.parametrize("in_triton", ALIGN, ids=ALIGN_IDS)
def test_alignment_of_one_expert_for_everyone(device: torch.device, in_triton: bool) -> None:
    ids = torch.zeros(20, 1, dtype=torch.int64, device=device)  # 20 pairs: tiles of 16 -> 32
    a = align_block_size(ids, 3, 16, in_triton=in_triton)
    check_alignment(a, ids, 3, 16)
    assert int(a.total.item()) == 32


@pytest.mark.parametrize("in_triton", ALIGN, ids=ALIGN_IDS)
@pytest.mark.parametrize(
    ("tokens", "num_experts", "k", "hidden", "inter", "skew"),
    [
        (1, 8, 2, 32, 48, False),  # decode (16-row tiles), 6 experts idle
        (3, 6, 3, 40, 24, False),  # partial column and K tiles everywhere
        (70, 4, 2, 48, 40, True),  # prefill (64-row tiles): expert 0 spans two, one idle
    ],
    ids=["decode-8e-top2", "3tok-6e-top3", "prefill-4e-top2-skewed"],
)
def test_fused_moe_matches_the_reference(
    device: torch.device,
    in_triton: bool,
    tokens: int,
    num_experts: int,
    k: int,
    hidden: int,
    inter: int,
    skew: bool,
) -> None:
    assert moe_config(tokens, num_experts).block_m == (16 if tokens <= num_experts else 64)
    weights, ids = routing(tokens, num_experts, k, device, seed=tokens, skew=skew)
    for i, dtype in enumerate(dtypes_for(device)):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(tokens, hidden, generator=g).to(dtype).to(device)
        w13, w2 = experts(num_experts, hidden, inter, dtype, device, seed=i)
        s13, s2 = prepare_experts(w13), prepare_experts(w2)
        assert s13.shape == (num_experts, 2 * inter, hidden)
        assert s2.shape == (num_experts, hidden, inter)
        x_before = x.clone()
        got = fused_moe(x, s13, s2, weights, ids, align_in_triton=in_triton)
        want = ref.fused_moe(x, w13, w2, weights, ids)
        atol, rtol = TOLERANCE[dtype]
        assert got.dtype == dtype and got.shape == x.shape
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
        assert torch.equal(x, x_before)
        if dtype == torch.float32:  # the routing weights matter: others give another result
            other = fused_moe(x, s13, s2, weights.flip(-1), ids, align_in_triton=in_triton)
            assert not torch.allclose(other, want, atol=atol, rtol=rtol)


def test_a_strided_hidden_and_the_reference_reading_the_stacks(device: torch.device) -> None:
    weights, ids = routing(5, 4, 2, device, seed=3)
    w13, w2 = experts(4, 24, 16, torch.float32, device, seed=3)
    wide = torch.randn(5, 64).to(device)
    x = wide[:, 20:44]  # row stride 64
    want = ref.fused_moe(x, w13, w2, weights, ids)
    s13, s2 = prepare_experts(w13), prepare_experts(w2)
    torch.testing.assert_close(fused_moe(x, s13, s2, weights, ids), want, atol=1e-4, rtol=1e-4)
    # The reference reads the stacks too (VLLM_DISABLED_KERNELS=fused_moe keeps them).
    torch.testing.assert_close(ref.fused_moe(x, s13, s2, weights, ids), want, atol=1e-6, rtol=1e-6)


def test_what_it_cannot_stack_runs_the_reference(device: torch.device) -> None:
    weights, ids = routing(4, 3, 2, device, seed=4)
    w13, w2 = experts(3, 16, 8, torch.float32, device, seed=4)
    ragged = [*w13[:2], w13[2][:, :8]]  # one expert of another shape: no stack
    assert isinstance(prepare_experts(ragged), list)
    assert prepare_experts([]) == []
    x = torch.randn(4, 16).to(device)
    # lists (prepare_experts disabled): the reference, exactly
    got = fused_moe(x, list(w13), list(w2), weights, ids)
    assert torch.equal(got, ref.fused_moe(x, w13, w2, weights, ids))
    assert fused_moe(
        x[:0], prepare_experts(w13), prepare_experts(w2), weights[:0], ids[:0]
    ).shape == (0, 16)


def _moe_config(experts_: int, k: int, hidden: int, inter: int, chunk: int) -> ModelConfig:
    return ModelConfig(
        architecture="MixtralForCausalLM",
        vocab_size=32,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        head_dim=hidden // 2,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attention_bias=False,
        sliding_window=None,
        num_experts=experts_,
        num_experts_per_tok=k,
        moe_intermediate_size=inter,
        moe_layers=(True,),
        moe_chunk_size=chunk,
    )


@pytest.mark.parametrize("in_triton", ALIGN, ids=ALIGN_IDS)
def test_the_model_mixture_in_chunks_over_the_triton_ops(
    device: torch.device, in_triton: bool
) -> None:
    # VLLM_FUSED_MOE_CHUNK_SIZE=4: 11 tokens in calls of 4, 4 and 3, each routed and run
    # on its own through the Triton op; the result is the reference's in one call.
    hidden, inter, num = 32, 24, 6
    g = torch.Generator().manual_seed(7)

    def weights() -> MoeWeights:
        return MoeWeights(
            router=torch.randn(num, hidden, generator=g).to(device),
            w13=[
                (0.2 * torch.randn(2 * inter, hidden, generator=g)).to(device) for _ in range(num)
            ],
            w2=[(0.2 * torch.randn(hidden, inter, generator=g)).to(device) for _ in range(num)],
        )

    plain = weights()
    stacked = MoeWeights(router=plain.router, w13=list(plain.w13), w2=list(plain.w2))
    cuda_ops = reference_ops().with_overrides(triton_ops(in_triton), "triton")
    prepare_mixture(stacked, cuda_ops)
    assert isinstance(stacked.w13, torch.Tensor) and stacked.w13.shape == (num, 2 * inter, hidden)
    ref_ops = reference_ops()
    prepare_mixture(plain, ref_ops)
    assert isinstance(plain.w13, list)  # the reference keeps the list
    h = torch.randn(11, hidden, generator=g).to(device)
    want = moe_mlp(ref_ops, h, plain, _moe_config(num, 2, hidden, inter, chunk=32768))
    got = moe_mlp(cuda_ops, h, stacked, _moe_config(num, 2, hidden, inter, chunk=4))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


MOE_CASES = [c for c in OP_CASES if c.op == "fused_moe"]


@pytest.mark.parametrize("case", MOE_CASES, ids=[c.label for c in MOE_CASES])
def test_the_kit_cases_with_the_triton_alignment(device: torch.device, case: OpCase) -> None:
    # test_triton_kit runs these with the default (torch) alignment.
    assert set(case.uses) == {"fused_moe", "prepare_linear", "prepare_experts"}
    ops = reference_ops().with_overrides(triton_ops(moe_align_in_triton=True), "triton")
    for dtype in dtypes_for(device):
        check_op(case, ops, dtype, device)


@pytest.mark.parametrize("value", ["0", "1"])
def test_the_platform_passes_the_variable_to_the_op(value: str) -> None:
    env = read_env({"VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON": value})
    ops = CudaPlatform(env).ops()  # no GPU needed: it only picks the kernels
    assert ops["prepare_experts"] is prepare_experts
    assert ops["fused_moe"].func is fused_moe
    assert ops["fused_moe"].keywords == {"align_in_triton": value == "1"}
