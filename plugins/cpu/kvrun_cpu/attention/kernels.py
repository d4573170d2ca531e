"""Attention math on gathered K/V, shared by the backends and the paged_attention op.

Grouped-query attention never repeats K/V: decode folds the query heads of a kv head
into that head's query rows ([n, Hk, G, D] against [n, Hk, S, D]); prefill hands
torch's SDPA ``enable_gqa=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["Workspace", "decode_attention", "prefill_attention"]


def decode_attention(
    query: torch.Tensor,  # [n, Hq, D]: one new token per request
    key: torch.Tensor,  # [n, Hk, S, D], any strides with a unit last stride; scratch
    value: torch.Tensor,  # [n, Hk, S, D]; scratch: masked slots are zeroed in place
    mask: torch.Tensor | None,  # [n, 1, 1, S] bool, True = attend; None = attend to all S
    scale: float,
) -> torch.Tensor:  # [n, Hq, D]
    n, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    q = query.reshape(n, num_kv_heads, num_heads // num_kv_heads, head_dim)
    if key.dtype != q.dtype:
        key, value = key.to(q.dtype), value.to(q.dtype)
    if mask is not None:
        # Masked slots hold whatever the padded gather found (stale or never-written
        # cache): a NaN key makes a NaN score and a NaN value survives a zero weight.
        # In place: callers hand over freshly gathered copies, so no clone is needed.
        unused = ~mask.view(n, 1, -1, 1)
        key.masked_fill_(unused, 0.0)
        value.masked_fill_(unused, 0.0)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scale)
    return out.reshape(n, num_heads, head_dim)


def prefill_attention(
    query: torch.Tensor,  # [Q, Hq, D]: one request's new tokens
    key: torch.Tensor,  # [Hk, S, D]: its whole context, new tokens last
    value: torch.Tensor,  # [Hk, S, D]
    mask: torch.Tensor | None,  # [Q, S] bool, True = attend; None = causal with S == Q
    scale: float,
) -> torch.Tensor:  # [Q, Hq, D]
    # SDPA's CPU flash kernel runs fastest on contiguous head-major inputs.
    q = query.transpose(0, 1).contiguous().unsqueeze(0)  # [1, Hq, Q, D]
    k = key.to(q.dtype).contiguous().unsqueeze(0)  # [1, Hk, S, D]
    v = value.to(q.dtype).contiguous().unsqueeze(0)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
    )
    return out[0].transpose(0, 1)


class Workspace:
    """Reused gather buffers, so that per-layer gathers do not fault in fresh pages.

    Buffers grow to the largest request seen and are then reused by every layer and
    step; views handed out are valid until the next call for the same slot.
    """

    def __init__(self) -> None:
        self._buffers: dict[int, torch.Tensor] = {}

    def take(
        self, slot: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[slot] = buf
        return buf[:numel].view(shape)
