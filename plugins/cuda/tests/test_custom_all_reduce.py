"""The peer-to-peer all-reduce (kvrun_cuda.custom_all_reduce): the group's verdict on
any machine, the kernels on two or more GPUs (skipped with the reason elsewhere)."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from kvrun_cuda.custom_all_reduce import (
    BUFFER_BYTES,
    ONE_SHOT_MAX_BYTES,
    GroupFacts,
    verdict,
)


def _facts(**changes: object) -> GroupFacts:
    base: dict[str, object] = {
        "hosts": ["node-a", "node-a"],
        "devices": [0, 1],
        "peers": [
            {1: (True, "a copy between the devices")},
            {0: (True, "a copy between the devices")},
        ],
        "dtype": torch.bfloat16,
        "rocm": False,
        "symmetric_memory": True,
    }
    base.update(changes)
    return GroupFacts(**base)  # type: ignore[arg-type]


def test_a_single_node_group_with_checked_peer_access_uses_it() -> None:
    use, why = verdict(_facts())
    assert use
    assert "a copy between the devices" in why


def test_peer_access_taken_on_the_drivers_word_says_so() -> None:
    report = (True, "the driver's report (VLLM_SKIP_P2P_CHECK=1)")
    use, why = verdict(_facts(peers=[{1: report}, {0: report}]))
    assert use
    assert "VLLM_SKIP_P2P_CHECK=1" in why


def test_one_pair_without_peer_access_sends_the_whole_group_to_nccl() -> None:
    peers = [
        {1: (True, "a copy between the devices"), 2: (True, "a copy between the devices")},
        {
            0: (True, "a copy between the devices"),
            2: (False, "a copy between the devices returned wrong data"),
        },
        {0: (True, "a copy between the devices"), 1: (True, "a copy between the devices")},
    ]
    use, why = verdict(_facts(hosts=["n"] * 3, devices=[0, 1, 2], peers=peers))
    assert not use
    assert "GPU 1 cannot read GPU 2" in why
    assert "returned wrong data" in why
    assert "VLLM_SKIP_P2P_CHECK" in why


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"hosts": ["node-a", "node-b"], "peers": [{}, {}]}, "spans nodes"),
        ({"dtype": torch.float16}, "torch.float16"),
        ({"rocm": True}, "RCCL"),
        ({"symmetric_memory": False}, "no symmetric-memory"),
    ],
)
def test_what_rules_the_path_out_is_named(changes: dict[str, object], named: str) -> None:
    use, why = verdict(_facts(**changes))
    assert not use
    assert named in why


def test_the_cuda_platform_offers_it_and_rocm_says_rccl() -> None:
    from kvrun.platforms import Platform
    from kvrun_cuda.platform import CudaPlatform

    assert CudaPlatform.custom_all_reduce is not Platform.custom_all_reduce
    rocm = pytest.importorskip("kvrun_rocm.platform")
    platform = object.__new__(rocm.RocmPlatform)
    reducer, why = platform.custom_all_reduce(None, torch.bfloat16)  # type: ignore[arg-type]
    assert reducer is None and "RCCL" in why


# ---- on real GPUs ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, world: int, port: int, results: dict[int, object]) -> None:
    import torch.distributed as dist

    from kvrun.distributed.parallel import ParallelConfig
    from kvrun.distributed.state import ProcessGroups
    from kvrun_cuda.custom_all_reduce import custom_all_reduce

    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    group = dist.new_group(list(range(world)))
    groups = ProcessGroups(ParallelConfig(world, 1), rank, group, tuple(range(world)))
    out: dict[str, object] = {}
    reducer, why = custom_all_reduce(groups, torch.bfloat16, skip_p2p_check=False)
    out["why"] = why
    if reducer is not None:
        for label, numel in (
            ("one shot", ONE_SHOT_MAX_BYTES // 2),
            ("two shot", BUFFER_BYTES // 2),
        ):
            gen = torch.Generator(device="cuda").manual_seed(1000 + rank)
            x = torch.randn(numel, generator=gen, device="cuda").to(torch.bfloat16)
            expected = x.float()
            dist.all_reduce(expected, group=group)  # the sum in float32 as the oracle
            taken = reducer.all_reduce(x)
            everyone = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(everyone, x, group=group)
            out[label] = (
                taken,
                float((x.float() - expected).abs().max()),
                float(expected.abs().max()),
                all(torch.equal(everyone[0], other) for other in everyone),
            )
        too_big = torch.zeros(BUFFER_BYTES // 2 + 8, dtype=torch.bfloat16, device="cuda")
        out["too big taken"] = reducer.all_reduce(too_big)
        out["fp16 taken"] = reducer.all_reduce(torch.zeros(64, dtype=torch.float16, device="cuda"))
        reducer.close()
    results[rank] = out
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs two or more NVIDIA GPUs (peer-to-peer all-reduce)",
)
def test_the_peer_to_peer_all_reduce_sums_like_nccl_on_every_rank() -> None:
    import torch.multiprocessing as mp

    world = min(torch.cuda.device_count(), 4)
    port = _free_port()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(world, port, results), nprocs=world, join=True)
        seen = dict(results)
    os.environ.pop("MASTER_ADDR", None)
    whys = {r["why"] for r in seen.values()}  # type: ignore[index]
    assert len(whys) == 1, whys  # every rank decided alike
    if "one shot" not in seen[0]:  # type: ignore[operator]
        pytest.skip(f"these GPUs take NCCL's path: {whys.pop()}")
    for out in seen.values():
        for label in ("one shot", "two shot"):
            taken, err, scale, same = out[label]  # type: ignore[index]
            assert taken, label
            assert same, f"{label}: ranks hold different bits"
            assert err <= 2**-7 * max(scale, 1.0), (label, err, scale)  # bf16 rounding
        assert out["too big taken"] is False  # type: ignore[index]
        assert out["fp16 taken"] is False  # type: ignore[index]
