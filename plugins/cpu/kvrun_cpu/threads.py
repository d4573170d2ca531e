"""VLLM_CPU_OMP_THREADS_BIND: which cores this process's compute threads run on.

The value is ``all`` (leave torch's thread count and the process affinity alone), a
core list such as ``0-3`` or ``0,2,4-7``, or one core list per rank separated by
``|`` (``0-1|2-3``: rank 0 gets cores 0 and 1, rank 1 gets 2 and 3).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable

import torch

from kvrun.errors import ConfigError

__all__ = ["apply_threads_bind", "format_cores", "parse_threads_bind"]

VAR = "VLLM_CPU_OMP_THREADS_BIND"
ACCEPTED = (
    "accepted: 'all', a core list such as '0-3' or '0,2,4-7', "
    "or one core list per rank separated by '|' such as '0-1|2-3'"
)


def format_cores(cores: Iterable[int]) -> str:
    """Cores as the shortest core-list string: ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    ordered = sorted(set(cores))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def _malformed(value: str, why: str) -> ConfigError:
    return ConfigError(f"{VAR}={value!r} is malformed: {why}; {ACCEPTED}")


def _parse_core(value: str, text: str) -> int:
    if not text.isdigit():
        raise _malformed(value, f"{text!r} is not a core number")
    return int(text)


def _parse_list(value: str, entry: str) -> tuple[int, ...]:
    cores: list[int] = []
    for item in entry.split(","):
        item = item.strip()
        if not item:
            raise _malformed(value, f"empty item in core list {entry!r}")
        if "-" in item:
            lo_text, _, hi_text = item.partition("-")
            lo, hi = _parse_core(value, lo_text.strip()), _parse_core(value, hi_text.strip())
            if lo > hi:
                raise _malformed(value, f"range {item!r} runs backwards")
            cores.extend(range(lo, hi + 1))
        else:
            cores.append(_parse_core(value, item))
    repeated = sorted({c for c in cores if cores.count(c) > 1})
    if repeated:
        raise _malformed(value, f"core(s) {format_cores(repeated)} listed more than once")
    return tuple(cores)


def parse_threads_bind(value: str, rank: int, available: Collection[int]) -> tuple[int, ...] | None:
    """The cores rank ``rank`` binds to, or None for ``all`` (keep the defaults).

    ``available`` is the set of cores this process may run on (os.sched_getaffinity);
    a listed core outside it is a ConfigError, as is any malformed value.
    """
    text = value.strip()
    if text == "all":
        return None
    if not text:
        raise _malformed(value, "it is empty")
    entries = text.split("|")
    lists = [_parse_list(value, entry.strip()) for entry in entries]
    if rank >= len(lists):
        raise ConfigError(
            f"{VAR}={value!r} lists cores for {len(lists)} rank(s), but this is rank {rank}; "
            f"give one core list per rank separated by '|'; {ACCEPTED}"
        )
    cores = lists[rank]
    missing = [c for c in cores if c not in available]
    if missing:
        raise ConfigError(
            f"{VAR}={value!r} names core(s) {format_cores(missing)} that do not exist for this "
            f"process; available cores: {format_cores(available)}; {ACCEPTED}"
        )
    return cores


def apply_threads_bind(cores: tuple[int, ...]) -> None:
    """Pin every thread of this process to ``cores`` and run one torch thread per core.

    All existing threads are re-pinned, not only the caller: an OpenMP pool created
    before this call keeps the affinity it was born with otherwise.
    """
    torch.set_num_threads(len(cores))
    os.sched_setaffinity(0, cores)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no procfs: the calling thread is pinned, new threads inherit it
        return
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cores)
        except (ProcessLookupError, PermissionError):  # thread gone, or not ours to move
            continue
