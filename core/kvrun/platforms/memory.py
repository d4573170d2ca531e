"""KV-cache budgets for devices with their own memory (GPUs): device-neutral arithmetic."""

from __future__ import annotations

__all__ = ["MEMORY_FRACTION", "device_memory_budget"]

GiB = 1 << 30
# vLLM's default gpu_memory_utilization: the share of the device this process may use.
MEMORY_FRACTION = 0.9


def device_memory_budget(free: int, total: int, model_bytes: int, where: str) -> tuple[int, str]:
    """KV-cache bytes: MEMORY_FRACTION of the device minus the weights, capped by what is free.

    The cap keeps the (1 - MEMORY_FRACTION) headroom when other processes or earlier
    allocations already hold memory. First cut: activation peaks are not profiled yet.
    """
    share = int(total * MEMORY_FRACTION)
    wanted = share - model_bytes
    cap = free - (total - share)
    budget = max(0, min(wanted, cap))
    reason = (
        f"{MEMORY_FRACTION} of {total / GiB:.2f} GiB on {where} minus "
        f"{model_bytes / GiB:.2f} GiB of weights"
    )
    if cap < wanted:
        reason += (
            f", capped to {budget / GiB:.2f} GiB because only {free / GiB:.2f} GiB is free "
            "(other allocations hold the rest)"
        )
    return budget, reason
