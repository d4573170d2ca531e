"""KV-allocator invariants: the plan keeps to the budget, allocation keeps to the plan.

The request describes a tiny model laid out by the platform's default attention
backend. Allocation is checked on a plan of the platform's own making, shrunk to a
few blocks, so the check costs nothing on a device with a large budget. Where the
default backend keeps multi-head latent attention's single-plane cache (``latent_kv``)
the same checks run on a latent request too: its plan is sized by one plane per token,
so the budget that held N tokens in two planes holds at least 2N. Nothing here imports
pytest.
"""

from __future__ import annotations

import dataclasses

import torch

from kvrun.errors import ConfigError
from kvrun.platforms import KVCachePlan, KVCacheRequest, Platform
from kvrun.testing.target import dtype_name

__all__ = [
    "check_allocation",
    "check_plan",
    "check_refuses_small_budget",
    "keeps_latent_cache",
    "kit_kv_request",
]

NUM_LAYERS = 2
# Blocks in the shrunk plan that is allocated: few enough to number every element.
ALLOC_BLOCKS = 3


def kit_kv_request(
    platform: Platform, dtype: torch.dtype, max_model_len: int = 64, *, latent: bool = False
) -> KVCacheRequest:
    """What the engine would ask for a 2-layer model with 2 kv heads of 16; ``latent``:
    in the default backend's single-plane latent layout (it must compute latent_kv)."""
    backend = platform.attention_backends()[platform.default_attention_backend]
    shape = backend.latent_kv_cache_shape if latent else backend.kv_cache_shape
    return KVCacheRequest(
        num_layers=NUM_LAYERS,
        num_kv_heads=2,
        head_dim=16,
        block_size=16,
        dtype=dtype,
        max_model_len=max_model_len,
        layer_shape=lambda n: shape(n, 16, 2, 16),
        kv_planes=1 if latent else 2,
    )


def keeps_latent_cache(platform: Platform) -> bool:
    """Whether the platform's default attention backend computes latent_kv."""
    backend = platform.attention_backends()[platform.default_attention_backend]
    return "latent_kv" in backend.features


def check_plan(platform: Platform, dtype: torch.dtype) -> KVCachePlan:
    """plan_kv_cache answers the request and stays within the budget it reports; a latent
    request (where the default backend keeps one) gets one plane's bytes per token."""
    plan = _check_plan(platform, kit_kv_request(platform, dtype), dtype_name(dtype))
    if keeps_latent_cache(platform):
        request = kit_kv_request(platform, dtype, latent=True)
        what = f"kv allocator plan ({dtype_name(dtype)}, latent cache)"
        latent = _check_plan(platform, request, f"{dtype_name(dtype)}, latent cache")
        per_token = latent.total_bytes // (latent.num_blocks * latent.block_size)
        assert per_token == request.bytes_per_token, (
            f"{what}: {latent.num_blocks} blocks take {latent.total_bytes} bytes, "
            f"{per_token} a token; one plane of {request.num_layers} layers x "
            f"{request.num_kv_heads} x {request.head_dim} is {request.bytes_per_token}"
        )
        if latent.budget_bytes == plan.budget_bytes:
            assert latent.num_blocks >= 2 * plan.num_blocks, (
                f"{what}: {latent.num_blocks} blocks from the budget of {plan.budget_bytes} "
                f"bytes that holds {plan.num_blocks} two-plane blocks; one plane holds twice "
                "the tokens (KVCacheRequest.bytes_per_block counts kv_planes)"
            )
    return plan


def _check_plan(platform: Platform, request: KVCacheRequest, label: str) -> KVCachePlan:
    plan = platform.plan_kv_cache(request)
    what = f"kv allocator plan ({label})"
    assert plan.total_bytes <= plan.budget_bytes, (
        f"{what}: plans {plan.total_bytes} bytes, over its budget of {plan.budget_bytes} "
        f"({plan.reason})"
    )
    assert plan.num_blocks >= request.min_blocks, (
        f"{what}: {plan.num_blocks} blocks cannot hold one sequence of max_model_len="
        f"{request.max_model_len} ({request.min_blocks} blocks); it should have refused"
    )
    expect = request.layer_shape(plan.num_blocks)
    assert tuple(plan.layer_shape) == tuple(expect), (
        f"{what}: layer_shape {plan.layer_shape}, but the attention backend lays out "
        f"{plan.num_blocks} blocks as {expect}"
    )
    got = (plan.dtype, plan.block_size, plan.num_layers)
    want = (request.dtype, request.block_size, request.num_layers)
    assert got == want, f"{what}: (dtype, block_size, num_layers) {got}, request {want}"
    assert plan.reason.strip(), f"{what}: the plan gives no reason (the start-up log prints it)"
    return plan


def check_refuses_small_budget(platform: Platform, dtype: torch.dtype) -> None:
    """A budget that cannot hold one max_model_len sequence is a ConfigError, not a plan."""
    probe = kit_kv_request(platform, dtype)
    budget, _ = platform.kv_cache_budget(probe)
    too_long = (budget // probe.bytes_per_block + 1) * probe.block_size
    request = kit_kv_request(platform, dtype, max_model_len=too_long)
    try:
        plan = platform.plan_kv_cache(request)
    except ConfigError as exc:
        assert str(exc).strip(), "kv allocator: the ConfigError has no message"
        return
    raise AssertionError(
        f"kv allocator ({dtype_name(dtype)}): planned {plan.num_blocks} blocks for "
        f"max_model_len={too_long}, which needs {request.min_blocks} blocks of "
        f"{request.bytes_per_block} bytes beyond its budget of {budget} bytes; "
        "it must raise kvrun.errors.ConfigError"
    )


def _int_view(t: torch.Tensor) -> torch.Tensor:
    # An integer view of the same bytes, so every element can hold a distinct number.
    kinds = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(kinds[t.element_size()])


def check_allocation(platform: Platform, dtype: torch.dtype) -> None:
    """allocate_kv_cache returns num_layers tensors of the plan's shape, dtype and device,
    none sharing memory with another or with itself (for a latent plan too, where the
    default backend keeps one)."""
    _check_allocation(platform, kit_kv_request(platform, dtype), dtype_name(dtype))
    if keeps_latent_cache(platform):
        request = kit_kv_request(platform, dtype, latent=True)
        _check_allocation(platform, request, f"{dtype_name(dtype)}, latent cache")


def _check_allocation(platform: Platform, request: KVCacheRequest, label: str) -> None:
    full = platform.plan_kv_cache(request)
    blocks = min(full.num_blocks, max(ALLOC_BLOCKS, request.min_blocks))
    plan = dataclasses.replace(
        full, num_blocks=blocks, layer_shape=tuple(request.layer_shape(blocks))
    )
    what = f"kv allocator allocate_kv_cache ({label}, {blocks} blocks)"
    caches = platform.allocate_kv_cache(plan, NUM_LAYERS)
    assert isinstance(caches, list | tuple) and len(caches) == NUM_LAYERS, (
        f"{what}: returned {type(caches).__name__} of "
        f"{len(caches) if isinstance(caches, list | tuple) else '?'} items for {NUM_LAYERS} layers"
    )
    for i, t in enumerate(caches):
        assert isinstance(t, torch.Tensor), f"{what}: layer {i} is {type(t).__name__}"
        assert tuple(t.shape) == tuple(plan.layer_shape), (
            f"{what}: layer {i} has shape {tuple(t.shape)}, the plan says {plan.layer_shape}"
        )
        assert t.dtype == plan.dtype, f"{what}: layer {i} is {t.dtype}, the plan says {plan.dtype}"
        assert t.device.type == platform.device.type, (
            f"{what}: layer {i} is on {t.device}, the platform's device is {platform.device}"
        )
    # Number every element of every layer, then read all back: shared storage between
    # layers, or blocks aliased inside one layer, lose numbers.
    offset = 0
    for t in caches:
        n = t.numel()
        view = _int_view(t)
        view.copy_(torch.arange(offset, offset + n).view(view.shape).to(view.dtype))
        offset += n
    offset = 0
    for i, t in enumerate(caches):
        n = t.numel()
        expect = torch.arange(offset, offset + n).to(_int_view(t).dtype).view(t.shape)
        same = _int_view(t).cpu() == expect
        assert bool(same.all()), (
            f"{what}: layer {i} shares memory with another layer or with itself "
            f"({int((~same).sum())} of {n} elements overwritten); every block of every "
            "layer must be its own storage"
        )
        offset += n
