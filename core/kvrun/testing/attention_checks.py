"""Each attention backend a platform offers against ReferenceAttention, step by step.

A scenario is a short run of engine-like steps over one paged cache: requests get
blocks from a shuffled pool (block 0, the table padding, is never handed out), every
step writes its new keys and values and attends, and the backend's output must match
the reference backend's at every step. The backend's cache starts as NaN everywhere,
so any slot it reads without having written it (another request's block, a padded
table entry, the tail of a last block) poisons the result. Nothing here imports pytest.

A latent spec (``LATENT_SPECS``: multi-head latent attention's single-plane cache, for
backends that compute ``latent_kv``) runs the same scenarios with every value equal to
its key, as DeepSeek passes it, in a cache of the backend's latent layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvrun.attention.base import AttentionBackend, AttentionLayerSpec, AttentionMetadata
from kvrun.attention.reference import ReferenceAttention
from kvrun.testing.op_checks import assert_close
from kvrun.testing.target import dtype_name

__all__ = ["LATENT_SPECS", "LAYER_SPECS", "SCENARIOS", "Scenario", "check_backend", "specs_for"]

BLOCK_SIZE = 16


@dataclass(frozen=True)
class Scenario:
    """Steps of (request, new tokens) pairs; ``prefix`` gives a request another's blocks."""

    name: str
    steps: tuple[tuple[tuple[str, int], ...], ...]
    # request -> (owner, tokens): starts with the owner's first blocks already computed
    prefix: tuple[tuple[str, str, int], ...] = ()


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("prefill", ((("a", 5), ("b", 21), ("c", 16)),)),
    Scenario("decode", ((("a", 5), ("b", 21)), (("a", 1), ("b", 1)), (("a", 1), ("b", 1)))),
    Scenario(
        "chunked-prefill",
        ((("a", 16),), (("a", 16), ("b", 3)), (("a", 5), ("b", 1)), (("a", 1), ("b", 1))),
    ),
    Scenario(
        "prefix-hit",
        ((("a", 37),), (("b", 9), ("a", 1)), (("b", 1), ("a", 1))),
        prefix=(("b", "a", 2 * BLOCK_SIZE),),
    ),
)

# (label, spec): multi-head, grouped-query, and one kv head shared by all (MQA).
LAYER_SPECS: tuple[tuple[str, AttentionLayerSpec], ...] = tuple(
    (
        f"{h}q{kv}kv-d{d}",
        AttentionLayerSpec(num_heads=h, num_kv_heads=kv, head_dim=d, scale=d**-0.5),
    )
    for h, kv, d in ((4, 4, 16), (4, 2, 32), (8, 1, 64))
)

# (label, spec): the latent cache, DeepSeek's shape in small: one kv head of a 32-wide
# latent and 16 rope columns, the value the latent alone.
LATENT_SPECS: tuple[tuple[str, AttentionLayerSpec], ...] = (
    (
        "4q1kv-d48-latent32",
        AttentionLayerSpec(
            num_heads=4, num_kv_heads=1, head_dim=48, scale=48**-0.5, latent_value_dim=32
        ),
    ),
)


def specs_for(backend: type[AttentionBackend]) -> tuple[tuple[str, AttentionLayerSpec], ...]:
    """The layer specs the kit runs ``backend`` on: the latent ones where it computes them."""
    return LAYER_SPECS + (LATENT_SPECS if "latent_kv" in backend.features else ())


def _total_tokens(scenario: Scenario) -> dict[str, int]:
    totals: dict[str, int] = {}
    for request, _, tokens in scenario.prefix:
        totals[request] = tokens
    for step in scenario.steps:
        for request, n in step:
            totals[request] = totals.get(request, 0) + n
    return totals


def check_backend(
    backend: AttentionBackend,
    scenario: Scenario,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> None:
    """Run the scenario through ``backend`` and ReferenceAttention; compare every step."""
    spec = backend.spec
    h, kv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    what = f"attention backend {type(backend).name!r} [{scenario.name}, {dtype_name(dtype)}]"
    g = torch.Generator().manual_seed(seed)
    totals = _total_tokens(scenario)
    num_blocks = sum(-(-t // BLOCK_SIZE) for t in totals.values()) + 3
    pool = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # never block 0
    # Per request: q, k, v for every position it will ever hold, drawn up front.
    data = {
        r: tuple(torch.randn((t, n, d), generator=g).to(dtype) for n in (h, kv, kv))
        for r, t in sorted(totals.items())
    }
    if spec.latent_value_dim is not None:  # the latent cache: each value is its key
        data = {r: (q, k, k) for r, (q, k, _) in data.items()}
    blocks: dict[str, list[int]] = {r: [] for r in totals}
    done = dict.fromkeys(totals, 0)
    shared = {request: (owner, tokens) for request, owner, tokens in scenario.prefix}
    for request, (owner, tokens) in shared.items():
        done[request] = tokens
        # The shared positions hold the owner's keys and values, as a real prefix hit does.
        for i in (1, 2):
            data[request][i][:tokens] = data[owner][i][:tokens]

    shape = backend.layer_cache_shape(num_blocks, BLOCK_SIZE, kv, d)
    if spec.latent_value_dim is not None:
        per_token = math.prod(shape) // (num_blocks * BLOCK_SIZE)
        assert per_token == kv * d, (
            f"{what}: its latent cache of {num_blocks} blocks is laid out as {shape}, "
            f"{per_token} values per token; the latent cache is one plane of {kv} x {d}"
        )
    cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    reference = ReferenceAttention(spec)
    ref_shape = reference.layer_cache_shape(num_blocks, BLOCK_SIZE, kv, d)
    ref_cache = torch.full(ref_shape, float("nan"), dtype=dtype, device=device)

    for index, step in enumerate(scenario.steps):
        q_parts, k_parts, v_parts, slots = [], [], [], []
        seq_lens, query_lens = [], []
        for request, n in step:
            if request in shared and not blocks[request]:
                # Its first step: take the owner's blocks, written by earlier steps.
                owner, tokens = shared[request]
                blocks[request] = blocks[owner][: tokens // BLOCK_SIZE]
                assert len(blocks[request]) * BLOCK_SIZE == tokens, "owner not run yet"
            start, end = done[request], done[request] + n
            while len(blocks[request]) * BLOCK_SIZE < end:
                blocks[request].append(pool.pop())
            q, k, v = data[request]
            q_parts.append(q[start:end])
            k_parts.append(k[start:end])
            v_parts.append(v[start:end])
            ids = blocks[request]
            slots += [ids[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)]
            seq_lens.append(end)
            query_lens.append(n)
            done[request] = end
        width = max(len(blocks[r]) for r, _ in step)
        table = [blocks[r] + [0] * (width - len(blocks[r])) for r, _ in step]
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        meta = AttentionMetadata(
            num_tokens=starts[-1],
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(table, dtype=torch.int32, device=device),
            query_lens=query_lens,
            seq_lens_host=seq_lens,
            block_size=BLOCK_SIZE,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
        )
        q, k, v = (torch.cat(parts).to(device) for parts in (q_parts, k_parts, v_parts))
        got = backend.forward(q.clone(), k.clone(), v.clone(), cache, meta)
        want = reference.forward(q, k, v, ref_cache, meta)
        layout = ", ".join(f"{r}: {n} new of {s}" for (r, n), s in zip(step, seq_lens))
        assert_close(got, want, dtype, f"{what}, step {index} ({layout})")
