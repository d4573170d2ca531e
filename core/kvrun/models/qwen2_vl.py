"""Qwen2-VL as kvrun code: its vision tower, and the Qwen2 decoder with M-RoPE.

The vision tower turns an image's (or a video's) patches into one row per placeholder
token: a patch embedding (the checkpoint's Conv3d, whose kernel equals its stride, is
a matrix over the flattened patch), blocks of LayerNorm, bidirectional attention within
each frame with a 2-D rotary embedding (h and w halves), and a quick-GELU MLP, then the
patch merger (LayerNorm, the ``merge x merge`` neighbours concatenated, a GELU MLP) that
maps to the language model's hidden size. The processor (:mod:`kvrun.multimodal.
processing`) orders patches block-major over merge blocks, as the merger expects.

The language model is :class:`~kvrun.models.llama.LlamaForCausalLM`'s Qwen2 arithmetic
on the platform's attention and ops; only its rotary positions differ. M-RoPE gives a
token three positions (t, h, w) and takes each rotary frequency's angle from one of them
(``mrope_section`` splits the head's frequencies into the three). Text tokens have three
equal positions, which is ordinary rotary at that position; so a step without media
rows passes plain ``[T]`` positions (a generated token's: its index + the request's
rope delta) and runs every fast path (fused decoder, decode graphs) unchanged. A step
whose chunk covers media rows passes ``[3, T]`` positions: the model builds each
token's rotary row from the three (exactly the values the [positions] table holds) and
runs the same rotary op on it.

Qwen2.5-VL is the same with another vision tower: attention within windows of
``window_size`` pixels except in ``fullatt_block_indexes``, RMSNorms, gated MLPs (and
its video M-RoPE time positions step by ``tokens_per_second`` x seconds per frame pair).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from kvrun.attention.base import AttentionBackend, AttentionMetadata
from kvrun.errors import ModelLoadError
from kvrun.models.config import ModelConfig
from kvrun.models.media_lm import MediaCausalLM
from kvrun.ops import OpTable

if TYPE_CHECKING:
    from kvrun.distributed.layers import ModelParallel

__all__ = [
    "Qwen2VLForConditionalGeneration",
    "Qwen2VisionTower",
    "Qwen2_5_VLForConditionalGeneration",
]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


@dataclass
class VisionBlock:
    """One vision block's weights (matrices prepared by the platform once loaded).

    Qwen2-VL: LayerNorms (with biases) and an MLP fc1 -> activation -> fc2; Qwen2.5-VL:
    RMSNorms (no biases) and a gated MLP (``fc1`` = gate|up merged, act(gate) * up)."""

    norm1: torch.Tensor  # [E]
    norm1_bias: torch.Tensor | None  # [E] (LayerNorm only)
    qkv: Any  # [3 E, E]
    qkv_bias: torch.Tensor  # [3 E]
    proj: Any  # [E, E]
    proj_bias: torch.Tensor  # [E]
    norm2: torch.Tensor  # [E]
    norm2_bias: torch.Tensor | None  # [E]
    fc1: Any  # [M, E], or [2 M, E] gate|up when gated
    fc1_bias: torch.Tensor  # [M] or [2 M]
    fc2: Any  # [E, M]
    fc2_bias: torch.Tensor  # [E]


class Qwen2VisionTower:
    """The vision encoder of Qwen2-VL (``qwen2_5=False``) or Qwen2.5-VL: the patches of
    one item -> its placeholder rows.

    Qwen2.5-VL's blocks attend within windows of ``window_size`` pixels (whole frames in
    ``fullatt_block_indexes``): the patches are reordered window by window (in merge
    units) before the blocks and the merged rows put back in the processor's order after
    the merger, as transformers does."""

    def __init__(
        self,
        vision: Mapping[str, Any],
        out_hidden: int,  # the language model's hidden size
        ops: OpTable,
        dtype: torch.dtype,
        device: torch.device,
        *,
        qwen2_5: bool = False,
    ) -> None:
        self.ops = ops
        self.dtype = dtype
        self.device = device
        self.qwen2_5 = qwen2_5
        self.embed_dim = e = int(vision["hidden_size"] if qwen2_5 else vision["embed_dim"])
        self.num_heads = int(vision["num_heads"])
        self.head_dim = e // self.num_heads
        self.patch_size = int(vision["patch_size"])
        self.temporal_patch_size = int(vision["temporal_patch_size"])
        self.merge = int(vision["spatial_merge_size"])
        self.in_channels = int(vision.get("in_channels", 3))
        act = str(vision.get("hidden_act", "silu" if qwen2_5 else "quick_gelu"))
        if act not in _ACTIVATIONS:
            raise ModelLoadError(
                f"vision_config hidden_act {act!r} is not supported; supported: "
                f"{', '.join(sorted(_ACTIVATIONS))}"
            )
        self.act = _ACTIVATIONS[act]
        if qwen2_5:
            mlp = int(vision["intermediate_size"])
            self.window_size = int(vision.get("window_size", 112))
            self.full_blocks = frozenset(int(i) for i in vision.get("fullatt_block_indexes", ()))
        else:
            mlp = int(e * float(vision.get("mlp_ratio", 4)))
            self.window_size = 0
            self.full_blocks = frozenset(range(int(vision["depth"])))
        self.mlp_size = mlp
        fc1_rows = 2 * mlp if qwen2_5 else mlp
        patch = self.in_channels * self.temporal_patch_size * self.patch_size**2
        theta = float((vision.get("rope_parameters") or {}).get("rope_theta", 10000.0))

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, device=device)

        def bias(size: int) -> torch.Tensor | None:
            return None if qwen2_5 else empty(size)

        self.patch_embed: Any = empty(e, patch)
        self.blocks = [
            VisionBlock(
                norm1=empty(e),
                norm1_bias=bias(e),
                qkv=empty(3 * e, e),
                qkv_bias=empty(3 * e),
                proj=empty(e, e),
                proj_bias=empty(e),
                norm2=empty(e),
                norm2_bias=bias(e),
                fc1=empty(fc1_rows, e),
                fc1_bias=empty(fc1_rows),
                fc2=empty(e, mlp),
                fc2_bias=empty(e),
            )
            for _ in range(int(vision["depth"]))
        ]
        merged = e * self.merge**2
        self.merger_norm = empty(e)
        self.merger_norm_bias = bias(e)
        self.merger_fc1: Any = empty(merged, merged)
        self.merger_fc1_bias = empty(merged)
        self.merger_fc2: Any = empty(out_hidden, merged)
        self.merger_fc2_bias = empty(out_hidden)
        # the 2-D rotary's frequencies: head_dim / 4 of them for h, as many for w
        quarter = self.head_dim // 2
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter))

    def destinations(self, prefix: str = "visual.") -> dict[str, torch.Tensor]:
        """Hugging Face names (under ``prefix``) -> our tensors."""
        dest = {
            # the Conv3d's [E, C, tps, ps, ps] kernel fills the [E, patch] matrix
            prefix + "patch_embed.proj.weight": self.patch_embed.view(
                self.embed_dim,
                self.in_channels,
                self.temporal_patch_size,
                self.patch_size,
                self.patch_size,
            ),
            prefix + "merger.ln_q.weight": self.merger_norm,
            prefix + "merger.mlp.0.weight": self.merger_fc1,
            prefix + "merger.mlp.0.bias": self.merger_fc1_bias,
            prefix + "merger.mlp.2.weight": self.merger_fc2,
            prefix + "merger.mlp.2.bias": self.merger_fc2_bias,
        }
        if self.merger_norm_bias is not None:
            dest[prefix + "merger.ln_q.bias"] = self.merger_norm_bias
        m = self.mlp_size
        for i, b in enumerate(self.blocks):
            p = f"{prefix}blocks.{i}."
            dest.update(
                {
                    p + "norm1.weight": b.norm1,
                    p + "attn.qkv.weight": b.qkv,
                    p + "attn.qkv.bias": b.qkv_bias,
                    p + "attn.proj.weight": b.proj,
                    p + "attn.proj.bias": b.proj_bias,
                    p + "norm2.weight": b.norm2,
                }
            )
            if b.norm1_bias is not None and b.norm2_bias is not None:
                dest[p + "norm1.bias"] = b.norm1_bias
                dest[p + "norm2.bias"] = b.norm2_bias
            if self.qwen2_5:
                dest.update(
                    {
                        p + "mlp.gate_proj.weight": b.fc1[:m],
                        p + "mlp.gate_proj.bias": b.fc1_bias[:m],
                        p + "mlp.up_proj.weight": b.fc1[m:],
                        p + "mlp.up_proj.bias": b.fc1_bias[m:],
                        p + "mlp.down_proj.weight": b.fc2,
                        p + "mlp.down_proj.bias": b.fc2_bias,
                    }
                )
            else:
                dest.update(
                    {
                        p + "mlp.fc1.weight": b.fc1,
                        p + "mlp.fc1.bias": b.fc1_bias,
                        p + "mlp.fc2.weight": b.fc2,
                        p + "mlp.fc2.bias": b.fc2_bias,
                    }
                )
        return dest

    def prepare(self) -> None:
        prepare = self.ops.prepare_linear
        self.patch_embed = prepare(self.patch_embed)
        self.merger_fc1 = prepare(self.merger_fc1)
        self.merger_fc2 = prepare(self.merger_fc2)
        for b in self.blocks:
            b.qkv, b.proj = prepare(b.qkv), prepare(b.proj)
            b.fc1, b.fc2 = prepare(b.fc1), prepare(b.fc2)

    def _rotary_table(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """[h * w, head_dim] cos | sin of one frame's patches, in the processor's
        block-major order: the first half's angles from h, the second's from w."""
        m = self.merge
        hpos = torch.arange(grid_h).view(-1, 1).expand(grid_h, grid_w)
        wpos = torch.arange(grid_w).view(1, -1).expand(grid_h, grid_w)
        shape = (grid_h // m, m, grid_w // m, m)
        hpos = hpos.reshape(shape).transpose(1, 2).flatten()
        wpos = wpos.reshape(shape).transpose(1, 2).flatten()
        freqs = torch.cat(
            (hpos.float()[:, None] * self.inv_freq, wpos.float()[:, None] * self.inv_freq), dim=1
        )  # [N, head_dim / 2]
        return torch.cat((freqs.cos(), freqs.sin()), dim=1).to(self.device)

    def _windows(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen2.5-VL's window order of one frame's merge units ([h * w / merge^2]) and
        each unit's window number, in that order (every frame has the same windows)."""
        window = self.window_size // self.merge // self.patch_size  # merge units a side
        gh, gw = h // self.merge, w // self.merge
        order: list[torch.Tensor] = []
        ids: list[torch.Tensor] = []
        for top in range(0, gh, window):
            for left in range(0, gw, window):
                rows = torch.arange(top, min(top + window, gh))
                cols = torch.arange(left, min(left + window, gw))
                units = rows[:, None] * gw + cols[None, :]
                order.append(units.flatten())
                ids.append(torch.full((units.numel(),), len(ids)))
        return torch.cat(order), torch.cat(ids)

    def _norm(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if bias is None:  # Qwen2.5-VL's RMSNorm
            out: torch.Tensor = self.ops.rms_norm(x, weight, 1e-6)
            return out
        return F.layer_norm(x, (self.embed_dim,), weight, bias, 1e-6)

    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """[t * h * w, patch] -> [t * h * w / merge^2, out_hidden]."""
        ops, e, unit = self.ops, self.embed_dim, self.merge**2
        t, h, w = (int(x) for x in grid_thw.tolist())
        frame = h * w
        n = t * frame
        assert pixel_values.shape[0] == n, (pixel_values.shape, (t, h, w))
        x = ops.linear(pixel_values.to(device=self.device, dtype=self.dtype), self.patch_embed)
        table = self._rotary_table(h, w)  # one frame's; every frame has the same
        # attention stays within a frame; Qwen2.5-VL's window blocks within a window of it,
        # after each frame's merge units are put in window order ([frame, frame] mask)
        window_mask = None
        order = None
        if self.window_size:
            units, windows = self._windows(h, w)
            table = table.view(-1, unit, table.shape[-1])[units].reshape(frame, -1)
            per_frame = frame // unit
            order = (units.view(1, -1) + per_frame * torch.arange(t).view(-1, 1)).flatten()
            order = order.to(self.device)
            x = x.view(-1, unit, e)[order].reshape(n, e)
            window_of = windows.to(self.device).repeat_interleave(unit)
            window_mask = window_of[:, None] == window_of[None, :]
        table = table.repeat(t, 1)
        rows = torch.arange(n, device=self.device)
        scale = 1.0 / math.sqrt(self.head_dim)
        for i, b in enumerate(self.blocks):
            y = self._norm(x, b.norm1, b.norm1_bias)
            qkv = ops.linear(y, b.qkv, b.qkv_bias).view(-1, 3, self.num_heads, self.head_dim)
            q, k = ops.rotary_embedding(rows, qkv[:, 0], qkv[:, 1], table)
            v = qkv[:, 2]
            # bidirectional attention within each frame (or window): [t, heads, frame, d]
            q, k, v = (z.reshape(t, frame, self.num_heads, -1).transpose(1, 2) for z in (q, k, v))
            mask = None if i in self.full_blocks else window_mask
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            attn = attn.transpose(1, 2).reshape(-1, e)
            x = x + ops.linear(attn, b.proj, b.proj_bias)
            y = self._norm(x, b.norm2, b.norm2_bias)
            inner = ops.linear(y, b.fc1, b.fc1_bias)
            if self.qwen2_5:
                gate, up = inner.chunk(2, dim=-1)
                inner = self.act(gate) * up
            else:
                inner = self.act(inner)
            x = x + ops.linear(inner, b.fc2, b.fc2_bias)
        y = self._norm(x, self.merger_norm, self.merger_norm_bias)
        y = y.reshape(-1, e * unit)
        y = F.gelu(ops.linear(y, self.merger_fc1, self.merger_fc1_bias))
        out: torch.Tensor = ops.linear(y, self.merger_fc2, self.merger_fc2_bias)
        if order is not None:  # back to the processor's order
            out = out[torch.argsort(order)]
        return out


class Qwen2VLForConditionalGeneration(MediaCausalLM):
    """Qwen2-VL: the vision tower, and the Qwen2 decoder with multimodal rotary positions.

    The runner calls :meth:`encode` for each media item (caching the rows by content
    hash), :meth:`embed_tokens` for a step's token rows, and ``forward`` with
    ``inputs_embeds`` and ``[3, T]`` positions when a chunk covers media rows; otherwise
    ``forward`` is the Qwen2 decoder's, which the fused decoder may take.
    """

    qwen2_5: ClassVar[bool] = False  # Qwen2.5-VL's vision tower
    lora_encoders: ClassVar[tuple[str, ...]] = ("visual",)

    def __init__(
        self,
        config: ModelConfig,
        ops: OpTable,
        attention: AttentionBackend,
        dtype: torch.dtype,
        device: torch.device,
        parallel: ModelParallel | None = None,  # the decoder's shard (kvrun.distributed)
    ) -> None:
        super().__init__(config, ops, attention, dtype, device, parallel)
        assert config.vision is not None and config.mrope_section
        self.visual = self.encoder = Qwen2VisionTower(
            config.vision, config.hidden_size, ops, dtype, device, qwen2_5=self.qwen2_5
        )
        half = config.head_dim // 2
        if sum(config.mrope_section) != half:
            raise ModelLoadError(
                f"{config.architecture}: mrope_section {list(config.mrope_section)} must sum "
                f"to head_dim / 2 = {half}"
            )
        # which of (t, h, w) each rotary frequency takes its angle from: [D / 2]
        self._mrope_component = torch.repeat_interleave(
            torch.arange(3), torch.tensor(config.mrope_section)
        ).to(device)
        self._step_table: torch.Tensor | None = None  # the [T, D] rotary rows of a 3-D step

    @staticmethod
    def canonical_name(name: str) -> str:
        """transformers 5's module names -> the names Qwen2-VL checkpoints are saved with."""
        if name.startswith("model.language_model."):
            return "model." + name.removeprefix("model.language_model.")
        if name.startswith("model.visual."):
            return name.removeprefix("model.")
        return name

    # multimodal --------------------------------------------------------------------
    def encode(self, modality: str, data: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One item's placeholder rows [length, H] (images and videos alike)."""
        return self.visual(data["pixel_values"], data["grid_thw"])

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T], or [3, T] (t, h, w) when a chunk covers media
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        lora: Any = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if positions.dim() == 1:
            return super().forward(input_ids, positions, kv_caches, meta, lora, inputs_embeds)
        self._step_table = self._mrope_table(positions)
        try:
            rows = torch.arange(positions.shape[1], device=positions.device)
            return super().forward(input_ids, rows, kv_caches, meta, lora, inputs_embeds)
        finally:
            self._step_table = None

    def _mrope_table(self, positions: torch.Tensor) -> torch.Tensor:
        """[3, T] positions -> [T, D] cos | sin rows: frequency j's angle from component
        mrope_component[j] (rows of the ordinary table, so text tokens are unchanged)."""
        half = self.config.head_dim // 2
        rows = self.cos_sin[positions]  # [3, T, D]
        pick = self._mrope_component.view(1, 1, half).expand(1, positions.shape[1], half)
        cos = rows[..., :half].gather(0, pick).squeeze(0)
        sin = rows[..., half:].gather(0, pick).squeeze(0)
        return torch.cat((cos, sin), dim=1)

    def _rotate(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        table = self._step_table if self._step_table is not None else self.cos_sin
        return self.ops.rotary_embedding(positions, q, k, table)  # type: ignore[no-any-return]


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen2.5-VL: Qwen2-VL's language model and M-RoPE (video time positions scaled by
    tokens_per_second, :mod:`kvrun.multimodal.processing`) with the Qwen2.5 vision tower
    (window attention, RMSNorms, gated MLPs)."""

    qwen2_5: ClassVar[bool] = True
