"""Each overridden kernel against the core's reference op on seeded random inputs.

A case builds fresh inputs twice (one set for the platform's op, one for the
reference), runs both, and compares every output with a dtype's tolerance. Inputs
must come back unchanged (the model reuses them: ``rms_norm``'s input is also the
residual), and ``reshape_and_cache`` runs on caches pre-filled with NaN, so a kernel
that skips a slot or writes one it was not given is caught. ``paged_attention`` reads
caches whose unused slots (blocks no table names, the tail of each last block) are
NaN: they must not reach the output. ``linear`` and ``embedding`` read their weight in
the form the platform's ``prepare_linear`` gives it, as the model passes it, and so do
``fused_moe``'s experts: each matrix through ``prepare_linear``, then each projection's
list through ``prepare_experts`` (a platform overriding any of the three gets the
fused_moe cases). Nothing here imports pytest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvrun.ops import OpTable, reference
from kvrun.testing.target import dtype_name

__all__ = ["OP_CASES", "TOLERANCE", "OpCase", "assert_close", "check_op"]

# Ops whose weight arguments (at these indices; a list: each of its matrices, then the
# list through prepare_experts) the model hands over as prepare_linear made them.
_PREPARED_ARG: dict[str, tuple[int, ...]] = {"linear": (1,), "embedding": (1,), "fused_moe": (1, 2)}

# (atol, rtol) per dtype: a few units in the last place of the values these cases make.
TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (3e-2, 3e-2),
}
EPS = 1e-5


@dataclass(frozen=True)
class OpCase:
    """One shape of one op: ``make(dtype, device, seed)`` -> (args, names of in-place args)."""

    op: str  # the op name in kvrun.ops.OP_NAMES
    label: str  # shape label for the test id, e.g. "7x33"
    make: Callable[[torch.dtype, torch.device, int], tuple[list[Any], frozenset[int]]]

    @property
    def uses(self) -> tuple[str, ...]:
        """Every op the case runs: a platform overriding any of them gets the case."""
        if self.op == "fused_moe":
            return (self.op, "prepare_linear", "prepare_experts")
        return (self.op, "prepare_linear") if self.op in _PREPARED_ARG else (self.op,)


def _randn(
    g: torch.Generator, *shape: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    return torch.randn(shape, generator=g).to(dtype=dtype, device=device)


def _norm_case(tokens: int, hidden: int, fused: bool) -> Callable[..., Any]:
    def make(
        dtype: torch.dtype, device: torch.device, seed: int
    ) -> tuple[list[Any], frozenset[int]]:
        g = torch.Generator().manual_seed(seed)
        x = _randn(g, tokens, hidden, dtype=dtype, device=device)
        weight = 1.0 + 0.1 * _randn(g, hidden, dtype=torch.float32, device=device)
        if not fused:
            return [x, weight.to(dtype), EPS], frozenset()
        residual = _randn(g, tokens, hidden, dtype=dtype, device=device)
        return [x, residual, weight.to(dtype), EPS], frozenset()

    return make


def _cos_sin(max_pos: int, head_dim: int, device: torch.device) -> torch.Tensor:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)  # [P, D/2]
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(device)  # [P, D]


def _rope_case(tokens: int, heads: int, kv_heads: int, head_dim: int, fused_qkv: bool) -> Any:
    def make(
        dtype: torch.dtype, device: torch.device, seed: int
    ) -> tuple[list[Any], frozenset[int]]:
        g = torch.Generator().manual_seed(seed)
        positions = torch.randint(0, 128, (tokens,), generator=g).to(device)
        if fused_qkv:  # views into one projection, as the model passes them
            qkv = _randn(g, tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
            q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
            k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim]
            k = k.view(tokens, kv_heads, head_dim)
        else:
            q = _randn(g, tokens, heads, head_dim, dtype=dtype, device=device)
            k = _randn(g, tokens, kv_heads, head_dim, dtype=dtype, device=device)
        return [positions, q, k, _cos_sin(128, head_dim, device)], frozenset()

    return make


def _silu_case(tokens: int, inner: int) -> Any:
    def make(
        dtype: torch.dtype, device: torch.device, seed: int
    ) -> tuple[list[Any], frozenset[int]]:
        g = torch.Generator().manual_seed(seed)
        return [_randn(g, tokens, 2 * inner, dtype=dtype, device=device)], frozenset()

    return make


def _cache_case(tokens: int, num_blocks: int, block_size: int, kv_heads: int, dim: int) -> Any:
    def make(
        dtype: torch.dtype, device: torch.device, seed: int
    ) -> tuple[list[Any], frozenset[int]]:
        g = torch.Generator().manual_seed(seed)
        key = _randn(g, tokens, kv_heads, dim, dtype=dtype, device=device)
        value = _randn(g, tokens, kv_heads, dim, dtype=dtype, device=device)
        shape = (num_blocks, block_size, kv_heads, dim)
        key_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
        value_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
        slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens].to(device)
        return [key, value, key_cache, value_cache, slots], frozenset({2, 3})

    return make


def _attention_case(
    seq_lens: list[int], query_lens: list[int], heads: int, kv_heads: int, dim: int
) -> Any:
    block_size = 16

    def make(
        dtype: torch.dtype, device: torch.device, seed: int
    ) -> tuple[list[Any], frozenset[int]]:
        g = torch.Generator().manual_seed(seed)
        blocks_per = [-(-s // block_size) for s in seq_lens]
        num_blocks = sum(blocks_per) + 3  # spare blocks, block 0 among them: never named
        order = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
        table = torch.zeros(len(seq_lens), max(blocks_per), dtype=torch.int32)
        shape = (num_blocks, block_size, kv_heads, dim)
        key_cache = torch.full(shape, float("nan"), dtype=dtype)
        value_cache = torch.full(shape, float("nan"), dtype=dtype)
        for i, (seq_len, n) in enumerate(zip(seq_lens, blocks_per)):
            ids = [order.pop() for _ in range(n)]
            table[i, :n] = torch.tensor(ids, dtype=torch.int32)
            for pos in range(seq_len):  # only real context slots get values
                block, offset = ids[pos // block_size], pos % block_size
                key_cache[block, offset] = torch.randn((kv_heads, dim), generator=g).to(dtype)
                value_cache[block, offset] = torch.randn((kv_heads, dim), generator=g).to(dtype)
        query = _randn(g, sum(query_lens), heads, dim, dtype=dtype, device=device)
        args = [
            query,
            key_cache.to(device),
            value_cache.to(device),
            table.to(device),
            list(seq_lens),
            list(query_lens),
            dim**-0.5,
        ]
        return args, frozenset()

    return make


def _linear_case(tokens: int, inner: int, outer: int, bias: bool) -> Any:
    def make(
        dtype: torch.dtype, device: torch.device, seed: int
    ) -> tuple[list[Any], frozenset[int]]:
        g = torch.Generator().manual_seed(seed)
        x = _randn(g, tokens, inner, dtype=dtype, device=device)
        weight = _randn(g, outer, inner, dtype=dtype, device=device)
        b = _randn(g, outer, dtype=dtype, device=device) if bias else None
        return [x, weight, b], frozenset()

    return make


def _embedding_case(tokens: int, vocab: int, hidden: int) -> Any:
    def make(
        dtype: torch.dtype, device: torch.device, seed: int
    ) -> tuple[list[Any], frozenset[int]]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (tokens,), generator=g)
        ids[0], ids[-1] = 0, vocab - 1  # both ends of the table
        return [ids.to(device), _randn(g, vocab, hidden, dtype=dtype, device=device)], frozenset()

    return make


def _awq_case(in_features: int, out_features: int, group_size: int) -> Any:
    """Random packed words (every nibble pattern, sign bit included) and scales in dtype."""

    def make(
        dtype: torch.dtype, device: torch.device, seed: int
    ) -> tuple[list[Any], frozenset[int]]:
        g = torch.Generator().manual_seed(seed)
        groups = 1 if group_size == -1 else -(-in_features // group_size)
        words = out_features // 8

        def packed(rows: int) -> torch.Tensor:
            return torch.randint(-(2**31), 2**31, (rows, words), generator=g).to(torch.int32)

        scales = (0.01 + 0.05 * torch.rand(groups, out_features, generator=g)).to(dtype)
        args = [packed(in_features).to(device), packed(groups).to(device), scales.to(device)]
        return [*args, group_size], frozenset()

    return make


def _moe_case(tokens: int, hidden: int, inter: int, experts: int, k: int) -> Any:
    """Random tokens routed to ``k`` distinct experts each, weights summing to 1; some
    experts get no token at all when tokens * k < experts."""

    def make(
        dtype: torch.dtype, device: torch.device, seed: int
    ) -> tuple[list[Any], frozenset[int]]:
        g = torch.Generator().manual_seed(seed)
        x = _randn(g, tokens, hidden, dtype=dtype, device=device)
        w13 = [
            0.2 * _randn(g, 2 * inter, hidden, dtype=dtype, device=device) for _ in range(experts)
        ]
        w2 = [0.2 * _randn(g, hidden, inter, dtype=dtype, device=device) for _ in range(experts)]
        ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
        weights = torch.rand(tokens, k, generator=g).softmax(dim=-1)
        return [x, w13, w2, weights.to(device), ids.to(device)], frozenset()

    return make


def _bitmask_case(rows: list[int], batch: int, vocab: int) -> Any:
    """Structured output's mask (logits are float32 whatever the model's dtype)."""

    def make(
        dtype: torch.dtype, device: torch.device, seed: int
    ) -> tuple[list[Any], frozenset[int]]:
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(batch, vocab, generator=g).to(device)
        words = (vocab + 31) // 32
        bitmask = torch.randint(-(2**31), 2**31, (len(rows), words), generator=g, dtype=torch.int64)
        bitmask = bitmask.to(torch.int32).to(device)
        index = torch.tensor(rows, dtype=torch.int64, device=device)
        return [logits, bitmask, index], frozenset({0})

    return make


def _argmax_case(batch: int, vocab: int) -> Any:
    """Greedy picks (logits are float32 whatever the model's dtype): random rows, and
    where there are at least 4 rows, a row whose maximum appears 3 times, one of -inf
    only and one with NaNs (the first NaN wins)."""

    def make(
        dtype: torch.dtype, device: torch.device, seed: int
    ) -> tuple[list[Any], frozenset[int]]:
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(batch, vocab, generator=g)
        if batch >= 4:
            top = float(logits[0].max()) + 1.0
            logits[0, [vocab // 3, vocab // 2, vocab - 1]] = top
            logits[1] = float("-inf")
            logits[2, [vocab // 2, vocab // 4]] = float("nan")
        return [logits.to(device)], frozenset()

    return make


def _lora_case(tokens: int, inner: int, outer: int, slots: int, rank: int) -> Any:
    """Tokens spread over every slot and none (-1), one slot used by no token; adapters
    of smaller rank than the slots' (zero rows in A), as the slots hold them."""

    def make(
        dtype: torch.dtype, device: torch.device, seed: int
    ) -> tuple[list[Any], frozenset[int]]:
        g = torch.Generator().manual_seed(seed)
        x = _randn(g, tokens, inner, dtype=dtype, device=device)
        y = _randn(g, tokens, outer, dtype=dtype, device=device)
        lora_a = 0.2 * _randn(g, slots, rank, inner, dtype=dtype, device=device)
        lora_b = 0.2 * _randn(g, slots, outer, rank, dtype=dtype, device=device)
        lora_a[0, rank // 2 :] = 0  # slot 0 holds an adapter of half the rank
        lora_b[0, :, rank // 2 :] = 0
        scales = (0.5 + torch.rand(slots, generator=g)).to(device)
        index = torch.randint(-1, max(slots - 1, 1), (tokens,), generator=g)
        index[0] = -1  # a token with no adapter, unless it is the only one
        index[-1] = 0
        return [y, x, lora_a, lora_b, scales, index.to(device)], frozenset()

    return make


OP_CASES: tuple[OpCase, ...] = (
    OpCase("linear", "1x64-to-96", _linear_case(1, 64, 96, bias=False)),
    OpCase("linear", "7x33-to-40-bias", _linear_case(7, 33, 40, bias=True)),
    OpCase("linear", "64x256-to-512", _linear_case(64, 256, 512, bias=False)),
    OpCase("embedding", "1-of-40x16", _embedding_case(1, 40, 16)),
    OpCase("embedding", "33-of-1000x96", _embedding_case(33, 1000, 96)),
    OpCase("rms_norm", "1x64", _norm_case(1, 64, fused=False)),
    OpCase("rms_norm", "7x33", _norm_case(7, 33, fused=False)),
    OpCase("rms_norm", "32x256", _norm_case(32, 256, fused=False)),
    OpCase("fused_add_rms_norm", "1x64", _norm_case(1, 64, fused=True)),
    OpCase("fused_add_rms_norm", "7x33", _norm_case(7, 33, fused=True)),
    OpCase("fused_add_rms_norm", "32x256", _norm_case(32, 256, fused=True)),
    OpCase("rotary_embedding", "1tok-4q2kv-d16", _rope_case(1, 4, 2, 16, fused_qkv=False)),
    OpCase("rotary_embedding", "9tok-8q8kv-d32", _rope_case(9, 8, 8, 32, fused_qkv=False)),
    OpCase("rotary_embedding", "5tok-4q1kv-d64-qkv-views", _rope_case(5, 4, 1, 64, fused_qkv=True)),
    OpCase("silu_and_mul", "1x64", _silu_case(1, 64)),
    OpCase("silu_and_mul", "13x96", _silu_case(13, 96)),
    OpCase("fused_moe", "1tok-8experts-top2", _moe_case(1, 32, 48, 8, 2)),
    OpCase("fused_moe", "37tok-4experts-top2", _moe_case(37, 64, 32, 4, 2)),
    OpCase("fused_moe", "70tok-16experts-top4", _moe_case(70, 48, 24, 16, 4)),
    # ~100 pairs per expert: every group spans two 64-row tiles and ends mid-tile, as a
    # stacked-expert kernel pads them
    OpCase("fused_moe", "150tok-3experts-top2", _moe_case(150, 40, 56, 3, 2)),
    OpCase("reshape_and_cache", "1tok-2kv-d16", _cache_case(1, 4, 16, 2, 16)),
    OpCase("reshape_and_cache", "37tok-4kv-d32", _cache_case(37, 6, 16, 4, 32)),
    OpCase("paged_attention", "decode-gqa", _attention_case([1, 17, 40], [1, 1, 1], 4, 2, 16)),
    OpCase("paged_attention", "prefill-mha", _attention_case([5, 21], [5, 21], 4, 4, 32)),
    OpCase("paged_attention", "chunk-after-prefix", _attention_case([35], [9], 8, 1, 16)),
    OpCase("paged_attention", "mixed-gqa", _attention_case([33, 7, 18], [1, 7, 4], 4, 2, 64)),
    # DeepSeek's absorbed latent attention: one kv head as wide as latent + rope (V2: 576)
    OpCase("paged_attention", "mla-latent", _attention_case([40, 9], [1, 9], 8, 1, 72)),
    OpCase("awq_dequantize", "64-to-32-group-32", _awq_case(64, 32, 32)),
    OpCase("awq_dequantize", "40-to-24-group-16-ragged", _awq_case(40, 24, 16)),
    OpCase("awq_dequantize", "48-to-16-one-group", _awq_case(48, 16, -1)),
    OpCase("add_lora", "1tok-1slot-r8", _lora_case(1, 64, 96, 1, 8)),
    OpCase("add_lora", "2tok-none-and-one", _lora_case(2, 16, 24, 2, 4)),
    OpCase("add_lora", "9tok-3slots-r16", _lora_case(9, 33, 40, 3, 16)),
    OpCase("add_lora", "64tok-4slots-qkv-r48", _lora_case(64, 128, 192, 4, 48)),
    OpCase("apply_token_bitmask", "3-of-5-rows-v100", _bitmask_case([0, 2, 4], 5, 100)),
    OpCase("apply_token_bitmask", "1-row-v4096", _bitmask_case([0], 1, 4096)),
    OpCase("apply_token_bitmask", "2-of-8-rows-v49152", _bitmask_case([6, 1], 8, 49152)),
    OpCase("argmax", "3-rows-v7", _argmax_case(3, 7)),
    OpCase("argmax", "5-rows-v100-ties-inf-nan", _argmax_case(5, 100)),
    OpCase("argmax", "64-rows-v49152-ties-inf-nan", _argmax_case(64, 49152)),
)


def assert_close(
    got: Any, want: Any, dtype: torch.dtype, what: str, *, poisoned: bool = False
) -> None:
    """Shapes, dtypes and values within ``dtype``'s tolerance; an AssertionError names ``what``."""
    __tracebackhide__ = True  # a vendor reads the message, not this helper
    if isinstance(want, tuple):
        items = len(got) if isinstance(got, tuple | list) else "?"
        assert isinstance(got, tuple | list) and len(got) == len(want), (
            f"{what}: returned {type(got).__name__} of {items} items; "
            f"the reference returns a tuple of {len(want)}"
        )
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, dtype, f"{what}, output {i}", poisoned=poisoned)
        return
    assert isinstance(got, torch.Tensor), f"{what}: returned {type(got).__name__}, not a tensor"
    assert got.shape == want.shape, (
        f"{what}: shape {tuple(got.shape)}, reference {tuple(want.shape)}"
    )
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, reference {want.dtype}"
    assert got.device.type == want.device.type, (
        f"{what}: on {got.device}, reference on {want.device}"
    )
    # ``poisoned``: a NaN-filled buffer the op writes into, whose untouched slots stay
    # NaN in both. Anywhere else a NaN in the reference means the check itself read
    # unwritten memory.
    want_nan = torch.isnan(want.float())
    assert poisoned or not bool(want_nan.any()), f"{what}: the reference produced NaN"
    nan = torch.isnan(got.float()) & ~want_nan
    assert not bool(nan.any()), (
        f"{what}: {int(nan.sum())} NaN value(s) where the reference has numbers "
        "(a skipped write, or poisoned cache slots leaking into the result)"
    )
    if not want.is_floating_point():  # ids and indices: no tolerance
        assert torch.equal(got.cpu(), want.cpu()), (
            f"{what}: differs from the reference: {got.tolist()} != {want.tolist()}"
        )
        return
    atol, rtol = TOLERANCE.get(dtype, (3e-2, 3e-2))
    try:
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, equal_nan=poisoned)
    except AssertionError as exc:
        raise AssertionError(
            f"{what}: differs from the reference ({dtype_name(dtype)}): {exc}"
        ) from None


def check_op(case: OpCase, ops: OpTable, dtype: torch.dtype, device: torch.device) -> None:
    """Run the platform's op (from ``ops``, the reference table with its overrides) and the
    reference op on the same fresh inputs and compare everything."""
    what = f"op {case.op!r} [{case.label}, {dtype_name(dtype)}]"
    args, _ = case.make(dtype, device, 0)
    ref_args, in_place = case.make(dtype, device, 0)
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    call_args = list(args)
    for index in _PREPARED_ARG.get(case.op, ()):
        weight = args[index]
        if isinstance(weight, list):  # fused_moe's experts of one projection
            call_args[index] = ops.prepare_experts([ops.prepare_linear(w) for w in weight])
        else:
            call_args[index] = ops.prepare_linear(weight)
    got = getattr(ops, case.op)(*call_args)
    want = getattr(reference, case.op)(*ref_args)
    if in_place:
        assert got is None, f"{what}: returned {type(got).__name__}; the reference returns None"
        for i in sorted(in_place):
            assert_close(
                args[i], ref_args[i], dtype, f"{what}, in-place argument {i}", poisoned=True
            )
    else:
        assert_close(got, want, dtype, what)
    for i, (a, b) in enumerate(zip(args, before)):
        if i not in in_place and isinstance(a, torch.Tensor):
            assert _same(a, b), (
                f"{what}: wrote to its input argument {i}; ops must leave their inputs unchanged"
            )


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise-equal values, NaN where NaN was (the poisoned caches)."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
