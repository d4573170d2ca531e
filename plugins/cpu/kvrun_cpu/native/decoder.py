"""The fused native decode step: a whole decode step in one C call.

Built by :meth:`kvrun_cpu.platform.CpuPlatform.fused_decoder` for float32 and bfloat16
models that declare kvrun's decoder layout (:mod:`kvrun.models.layout`, which says
exactly what arithmetic ``csrc/decoder.c`` implements) on the ``TORCH_SDPA`` cache
layout, and tried by the model runner before the op-by-op forward for every step made
of decodes only (up to ``max_num_seqs`` of them). Its hidden states are bit for bit
those of the op-by-op native path (``csrc/decoder.c`` runs the same row functions).
Its speed against the op-by-op path is in BENCHMARKS.md.

LoRA: once :meth:`NativeDecoder.attach_lora` has handed it the adapter slots' tensors
(:class:`kvrun.lora.manager.LoraManager`'s, filled in place as adapters come and go), a
step given each token's slot adds the adapters after each projection in the same call,
as the op-by-op path's ``add_lora`` (``csrc/lora.c``) does, bit for bit.

Quantized weights (``quantization="gguf"`` / ``"awq"``): each matrix carries its format
(``_Layer.quant``: float panels, or ``csrc/quant.c``'s code), so a model mixing them (a
GGUF file's Q4_1 layers beside Q6_K or dequantized ones) runs whole. A quantized
projection's input is quantized to int8 per token and block of 32 once, by the thread
that wrote it, before the barrier; the matmul is quant.c's, so the step is bit for bit
the op-by-op quantized path (``plugins/cpu/tests/test_cpu_fused_quantized.py``). LoRA on
such a model stays op by op (:meth:`NativeDecoder.attach_lora` says so).
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from kvrun.attention.base import AttentionMetadata
from kvrun.errors import KvrunError
from kvrun_cpu.native.packed import PANEL, PackedWeight
from kvrun_cpu.native.quantized import QBLOCK, QuantizedPackedWeight

__all__ = ["NativeDecoder", "unsupported_reason"]

_LAYER_FIELDS = (
    "input_norm",
    "qkv",
    "qkv_bias",
    "o",
    "post_norm",
    "gate_up",
    "down",
    "key_cache",
    "value_cache",
    "q_norm",
    "k_norm",
)
_MATRICES = ("qkv", "o", "gate_up", "down")  # packed; the norms and the bias are plain
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the C dtype codes
# Codes kvrun_decode_step returns for input it refuses, by what was out of range.
STEP_ERRORS = {
    1: "token id outside the vocabulary",
    2: "position outside the rotary table",
    3: "cache slot outside the KV cache",
    4: "context length below 1 or beyond the block table",
    5: "block id outside the KV cache",
    6: "LoRA slot outside the attached adapter slots",
}
# The projections adapters may change, in csrc/decoder.c's order (LORA_QKV ...).
LORA_MATRICES = ("qkv", "o", "gate_up", "down")


class _Layer(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_void_p) for name in _LAYER_FIELDS),
        ("lora_a", ctypes.c_void_p * len(LORA_MATRICES)),
        ("lora_b", ctypes.c_void_p * len(LORA_MATRICES)),
        ("quant", ctypes.c_int64 * len(_MATRICES)),  # 0: float panels; else quant.c's format
    ]


class _Model(ctypes.Structure):
    # Mirrors kv_decoder in csrc/decoder.c field for field.
    _fields_ = [
        *((name, ctypes.c_int64) for name in ("num_layers", "hidden", "num_heads")),
        *((name, ctypes.c_int64) for name in ("num_kv_heads", "head_dim", "intermediate")),
        ("vocab", ctypes.c_int64),
        ("eps", ctypes.c_double),
        ("scale", ctypes.c_double),
        ("embed", ctypes.c_void_p),
        ("final_norm", ctypes.c_void_p),
        ("cos_sin", ctypes.c_void_p),
        ("max_pos", ctypes.c_int64),
        *((name, ctypes.c_int64) for name in ("c_head", "c_block", "c_slot")),
        ("block_size", ctypes.c_int64),
        ("num_blocks", ctypes.c_int64),
        ("layers", ctypes.POINTER(_Layer)),
        ("dtype", ctypes.c_int64),
        ("lora_slots", ctypes.c_int64),
        ("lora_rank", ctypes.c_int64 * len(LORA_MATRICES)),
        ("lora_scales", ctypes.c_void_p),
        ("embed_quant", ctypes.c_int64),
    ]


def unsupported_reason(model: Any, kv_caches: list[torch.Tensor]) -> str | None:
    """Why this model cannot run fused (None: it can)."""
    from kvrun.models.layout import layout_mismatch
    from kvrun_cpu.attention.sdpa import TorchSdpaAttention

    mismatch = layout_mismatch(model)  # the decoder reads the model as that layout
    if mismatch is not None:
        return mismatch
    dtype = model.dtype
    if dtype not in _DTYPES:
        return f"the model runs in {str(dtype).removeprefix('torch.')}, not float32 or bfloat16"
    if not isinstance(model.attention, TorchSdpaAttention):
        return f"the attention backend is {model.attention.name}, not TORCH_SDPA"
    if any(c.dtype != dtype or not c.is_contiguous() for c in kv_caches):
        return "the KV cache is not contiguous and in the model's dtype"
    matrices = [model.embed, *(getattr(lay, n) for lay in model.layers for n in _MATRICES)]
    if not all(
        isinstance(m, (PackedWeight, QuantizedPackedWeight)) and m.dtype == dtype for m in matrices
    ):
        return "the weights are not packed for the native kernels"
    c = model.config
    if c.intermediate_size % PANEL:
        return f"intermediate_size {c.intermediate_size} is not a multiple of {PANEL}"
    group = c.num_heads // c.num_kv_heads * c.head_dim  # attn columns one kv head writes
    if group % QBLOCK and any(isinstance(lay.o, QuantizedPackedWeight) for lay in model.layers):
        return (
            f"o_proj is quantized and a kv head's {group} attention columns are not whole "
            f"blocks of {QBLOCK}"
        )
    return None


def _format(matrix: PackedWeight | QuantizedPackedWeight) -> int:
    """csrc/decoder.c's code for how a matrix is stored: 0 for float panels, else
    csrc/quant.c's format."""
    return matrix.bits if isinstance(matrix, QuantizedPackedWeight) else 0


class NativeDecoder:
    """A :class:`kvrun.platforms.DecodeGraphRunner` over the native decode step."""

    def __init__(
        self, native: Any, model: Any, kv_caches: list[torch.Tensor], max_tokens: int
    ) -> None:
        """``max_tokens``: the most decode tokens a step may have (the engine's
        max_num_seqs); the scratch is sized for it and bigger steps run op by op."""
        self._fn = native.decode_step_fn
        self.threads = native.threads
        c = model.config
        # Everything the C structs point at stays referenced here.
        self._tensors: list[torch.Tensor] = []

        def ptr(
            t: torch.Tensor | PackedWeight | QuantizedPackedWeight | None,
            dtype: torch.dtype = model.dtype,
        ) -> int | None:
            if t is None:
                return None
            if isinstance(t, PackedWeight):
                t = t.panels
            elif isinstance(t, QuantizedPackedWeight):
                t, dtype = t.blocks, torch.uint8
            assert t.dtype == dtype and t.is_contiguous()
            self._tensors.append(t)
            return t.data_ptr()

        self._layers = (_Layer * c.num_layers)()
        for dst, layer, cache in zip(self._layers, model.layers, kv_caches, strict=True):
            for name in _LAYER_FIELDS[:7]:
                setattr(dst, name, ptr(getattr(layer, name)))
            dst.key_cache, dst.value_cache = ptr(cache[0]), ptr(cache[1])
            dst.q_norm, dst.k_norm = ptr(layer.q_norm), ptr(layer.k_norm)  # None: no norms
            for i, name in enumerate(_MATRICES):
                dst.quant[i] = _format(getattr(layer, name))
        _, _, num_blocks, block_size, _ = kv_caches[0].shape
        c_head, c_block, c_slot, _ = kv_caches[0][0].stride()
        self._model = _Model(
            num_layers=c.num_layers,
            hidden=c.hidden_size,
            num_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            intermediate=c.intermediate_size,
            vocab=c.vocab_size,
            eps=c.rms_norm_eps,
            scale=model.attention.spec.scale,
            embed=ptr(model.embed),
            final_norm=ptr(model.norm),
            cos_sin=ptr(model.cos_sin, torch.float32),  # RoPE tables stay float32
            max_pos=model.cos_sin.shape[0],
            c_head=c_head,
            c_block=c_block,
            c_slot=c_slot,
            block_size=block_size,
            num_blocks=num_blocks,
            layers=self._layers,
            dtype=_DTYPES[model.dtype],
            embed_quant=_format(model.embed),
        )
        # GGUF/AWQ matrices run as stored (csrc/quant.c), the rest as float panels
        self.quantized = any(dst.quant[i] for dst in self._layers for i in range(len(_MATRICES)))
        self.hidden_size = c.hidden_size
        self.dtype = model.dtype
        self.max_tokens = max_tokens
        self._scratch_fn = native.decode_scratch_fn
        self._scratch = self._new_scratch()
        self._where = ctypes.c_int64()
        self._shapes = {  # each projection's (in, out) features
            "qkv": (c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim),
            "o": (c.num_heads * c.head_dim, c.hidden_size),
            "gate_up": (c.hidden_size, 2 * c.intermediate_size),
            "down": (c.intermediate_size, c.hidden_size),
        }
        self.lora_attached = False
        self.steps = 0  # steps it ran
        self.lora_steps = 0  # of those, steps where some token had an adapter

    def _new_scratch(self) -> torch.Tensor:
        scratch = self._scratch_fn(ctypes.byref(self._model), self.max_tokens)
        return torch.empty(scratch, dtype=self.dtype)

    def attach_lora(
        self,
        layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]],
        scales: torch.Tensor,
    ) -> str | None:
        """Take the adapter slots' tensors for every later step (None), or say why the
        steps with adapters must run op by op (then nothing is attached).

        ``layers`` per layer: projection name -> (A [S, R, in], B [S, out, R]) over every
        slot (a layer may lack some); ``scales`` [S] float32. The tensors are read in place
        at each step, so their contents may change (adapters loaded into slots), never
        their storage.
        """
        if self.quantized:
            return "LoRA adapters on GGUF/AWQ weights run as stored are not in decoder.c"
        if len(layers) != len(self._layers):
            return f"the adapters have {len(layers)} layers, the model {len(self._layers)}"
        num_slots = scales.shape[0] if scales.dim() == 1 else -1
        if scales.dtype != torch.float32 or not scales.is_contiguous() or num_slots < 1:
            return "the adapter scales are not a contiguous float32 vector"
        ranks: dict[str, int] = {}
        for index, pairs in enumerate(layers):
            for name, (a, b) in pairs.items():
                if name not in self._shapes:
                    return f"layer {index}'s adapters change {name}, which decoder.c does not"
                k, n = self._shapes[name]
                r = ranks.setdefault(name, a.shape[-2])
                if (
                    a.shape != (num_slots, r, k)
                    or b.shape != (num_slots, n, r)
                    or any(t.dtype != self.dtype or not t.is_contiguous() for t in (a, b))
                ):
                    return (
                        f"layer {index}'s {name} adapters are not [slots, rank, in] and "
                        f"[slots, out, rank] contiguous tensors in {str(self.dtype)[6:]}"
                    )
        for dst, pairs in zip(self._layers, layers, strict=True):
            for i, name in enumerate(LORA_MATRICES):
                a_b = pairs.get(name)
                dst.lora_a[i] = None if a_b is None else a_b[0].data_ptr()
                dst.lora_b[i] = None if a_b is None else a_b[1].data_ptr()
                self._tensors.extend(a_b or ())
        self._tensors.append(scales)
        self._model.lora_slots = num_slots
        for i, name in enumerate(LORA_MATRICES):
            self._model.lora_rank[i] = ranks.get(name, 0)
        self._model.lora_scales = scales.data_ptr()
        self._scratch = self._new_scratch()
        self.lora_attached = True
        return None

    def run(
        self,
        input_ids: torch.Tensor,  # [N] int64
        positions: torch.Tensor,  # [N] int64
        meta: AttentionMetadata,
        lora_slots: torch.Tensor | None = None,  # [N] int64 each token's slot, -1: none
    ) -> torch.Tensor | None:  # [N, hidden_size], or None: not a step this runs
        """The step's normed hidden states; None for a step it does not take (a prefill,
        more tokens than its scratch, adapters while none are attached)."""
        m = input_ids.shape[0]
        if m > self.max_tokens or meta.max_query_len != 1 or meta.num_tokens != m:
            return None
        if lora_slots is not None and (
            not self.lora_attached
            or lora_slots.dtype != torch.int64
            or not lora_slots.is_contiguous()
            or lora_slots.shape != (m,)
        ):
            return None
        tables, seq_lens, slots = meta.block_tables, meta.seq_lens, meta.slot_mapping
        if (
            tables.dtype != torch.int32
            or not tables.is_contiguous()
            or seq_lens.dtype != torch.int32
            or not seq_lens.is_contiguous()
            or slots.dtype != torch.int64
            or not slots.is_contiguous()
            or not input_ids.is_contiguous()
            or not positions.is_contiguous()
        ):
            return None
        hidden = torch.empty((m, self.hidden_size), dtype=self.dtype)
        code = self._fn(
            ctypes.byref(self._model),
            input_ids.data_ptr(),
            positions.data_ptr(),
            slots.data_ptr(),
            tables.data_ptr(),
            tables.shape[1],
            seq_lens.data_ptr(),
            None if lora_slots is None else lora_slots.data_ptr(),
            m,
            hidden.data_ptr(),
            self._scratch.data_ptr(),
            ctypes.byref(self._where),
            self.threads,
        )
        if code:
            raise KvrunError(
                f"native decode step: row {self._where.value}: {STEP_ERRORS.get(code, code)}"
            )
        self.steps += 1
        self.lora_steps += lora_slots is not None
        return hidden
