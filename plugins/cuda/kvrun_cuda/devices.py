"""Which GPU this process drives (CUDA_VISIBLE_DEVICES, LOCAL_RANK) and peer access.

The CUDA runtime applies CUDA_VISIBLE_DEVICES itself when it initialises; kvrun reads
the same text to explain a bad device choice before torch would fail with an
"invalid device ordinal".
"""

from __future__ import annotations

from kvrun.errors import ConfigError

__all__ = ["device_index", "peer_access", "visible_devices"]


def visible_devices(text: str | None) -> list[str] | None:
    """The entries of CUDA_VISIBLE_DEVICES; None when unset (every GPU is visible).

    Entries are ordinals or GPU-/MIG- UUIDs; the runtime stops at the first invalid
    entry, and an empty value hides every GPU.
    """
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def device_index(local_rank: int, visible_text: str | None, device_count: int) -> int:
    """The torch device index for ``local_rank`` (LOCAL_RANK): one GPU per local rank."""
    visible = visible_devices(visible_text)
    if visible is not None and not visible:
        raise ConfigError(
            f"CUDA_VISIBLE_DEVICES={visible_text!r} hides every GPU; unset it or list the "
            "GPUs this process may use, e.g. CUDA_VISIBLE_DEVICES=0,1"
        )
    if local_rank >= device_count:
        shown = (
            f"CUDA_VISIBLE_DEVICES={visible_text!r} leaves {device_count}"
            if visible is not None
            else f"this machine has {device_count}"
        )
        raise ConfigError(
            f"LOCAL_RANK={local_rank} needs GPU index {local_rank}, but {shown} visible "
            f"GPU(s) (indices 0..{device_count - 1}); lower LOCAL_RANK or show more GPUs"
        )
    return local_rank


def peer_access(src: int, dst: int, skip_check: bool) -> tuple[bool, str]:
    """Whether GPU ``src`` can read ``dst``'s memory directly, and how that was decided.

    With VLLM_SKIP_P2P_CHECK the driver's report is trusted; otherwise a tensor is
    copied between the two devices and compared, because some drivers report peer
    access that then corrupts data. Needed once kvrun runs tensor parallelism
    (custom all-reduce); nothing calls it on a single GPU.
    """
    import torch

    reported = bool(torch.cuda.can_device_access_peer(src, dst))
    if skip_check or not reported:
        return reported, "the driver's report" + (" (VLLM_SKIP_P2P_CHECK=1)" if skip_check else "")
    probe = torch.arange(1 << 16, dtype=torch.float32, device=f"cuda:{src}")
    copied = probe.to(f"cuda:{dst}").to(f"cuda:{src}")
    ok = bool(torch.equal(probe, copied))
    return ok, "a copy between the devices" + ("" if ok else " returned wrong data")
