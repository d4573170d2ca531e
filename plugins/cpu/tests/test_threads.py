"""VLLM_CPU_OMP_THREADS_BIND: the parser's table and a real bind through CpuPlatform."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from kvrun.envs import read_env
from kvrun.errors import ConfigError
from kvrun_cpu.platform import CpuPlatform
from kvrun_cpu.threads import apply_threads_bind, format_cores, parse_threads_bind

ACCEPTED = (
    "accepted: 'all', a core list such as '0-3' or '0,2,4-7', "
    "or one core list per rank separated by '|' such as '0-1|2-3'"
)
EIGHT = range(8)


@pytest.mark.parametrize(
    ("value", "rank", "cores"),
    [
        ("all", 0, None),
        (" all ", 3, None),
        ("0", 0, (0,)),
        ("0-1", 0, (0, 1)),
        ("0,2,4-7", 0, (0, 2, 4, 5, 6, 7)),
        ("3,1", 0, (3, 1)),
        ("0-1|2-3", 0, (0, 1)),
        ("0-1|2-3", 1, (2, 3)),
        ("0|1|2,5", 2, (2, 5)),
        (" 0 - 2 , 7 ", 0, (0, 1, 2, 7)),
    ],
)
def test_parse_accepts(value: str, rank: int, cores: tuple[int, ...] | None) -> None:
    assert parse_threads_bind(value, rank, EIGHT) == cores


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "it is empty"),
        ("a-b", "'a' is not a core number"),
        ("0,,1", "empty item in core list '0,,1'"),
        ("3-1", "range '3-1' runs backwards"),
        ("0-2,1", "core(s) 1 listed more than once"),
        ("-1", "'' is not a core number"),
        ("0-1|", "empty item in core list ''"),
        ("auto", "'auto' is not a core number"),
    ],
)
def test_parse_rejects_malformed(value: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_threads_bind(value, 0, EIGHT)
    assert str(err.value) == f"VLLM_CPU_OMP_THREADS_BIND={value!r} is malformed: {why}; {ACCEPTED}"


def test_parse_rejects_cores_that_do_not_exist() -> None:
    with pytest.raises(ConfigError) as err:
        parse_threads_bind("0-3,9", 0, [0, 1])
    assert str(err.value) == (
        "VLLM_CPU_OMP_THREADS_BIND='0-3,9' names core(s) 2-3,9 that do not exist for this "
        f"process; available cores: 0-1; {ACCEPTED}"
    )


def test_parse_rejects_a_rank_without_an_entry() -> None:
    with pytest.raises(ConfigError) as err:
        parse_threads_bind("0-1|2-3", 2, EIGHT)
    assert str(err.value) == (
        "VLLM_CPU_OMP_THREADS_BIND='0-1|2-3' lists cores for 2 rank(s), but this is rank 2; "
        f"give one core list per rank separated by '|'; {ACCEPTED}"
    )


def test_format_cores() -> None:
    assert format_cores([5, 0, 1, 2, 9, 8]) == "0-2,5,8-9"
    assert format_cores([]) == ""


@pytest.fixture
def restore_threads() -> Iterator[None]:
    threads, cores = torch.get_num_threads(), tuple(sorted(os.sched_getaffinity(0)))
    yield
    apply_threads_bind(cores)
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("restore_threads")
def test_setup_process_binds_this_ranks_cores() -> None:
    first = min(os.sched_getaffinity(0))
    value = f"{first + 1000}|{first}"  # rank 0's entry would fail: rank 1's must be used
    CpuPlatform(read_env({"VLLM_CPU_OMP_THREADS_BIND": value})).setup_process(rank=1)
    assert torch.get_num_threads() == 1
    assert os.sched_getaffinity(0) == {first}
    assert all(os.sched_getaffinity(int(t)) == {first} for t in os.listdir("/proc/self/task"))


@pytest.mark.usefixtures("restore_threads")
def test_setup_process_all_leaves_threads_alone() -> None:
    threads, cores = torch.get_num_threads(), os.sched_getaffinity(0)
    CpuPlatform(read_env({})).setup_process()
    assert (torch.get_num_threads(), os.sched_getaffinity(0)) == (threads, cores)


def test_setup_process_rejects_a_missing_core_before_touching_anything() -> None:
    cores = os.sched_getaffinity(0)
    missing = max(cores) + 1
    platform = CpuPlatform(read_env({"VLLM_CPU_OMP_THREADS_BIND": str(missing)}))
    with pytest.raises(ConfigError, match=rf"names core\(s\) {missing} that do not exist"):
        platform.setup_process()
    assert os.sched_getaffinity(0) == cores
