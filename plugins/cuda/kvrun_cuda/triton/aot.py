"""Ahead-of-time compilation of every kernel for a GPU target, with no GPU present.

Why: CI and most development machines have no GPU, and the interpreter runs a
kernel's Python, not its compiled form, so it cannot catch what only the compiler
rejects (a tile too large for tl.dot, a type error in lowering). Compiling each
kernel here, for sm_90 (Hopper) and gfx942 (MI300), proves it builds. The shapes are
those of a Llama-class model (32 query heads, 8 kv heads, head size 128, hidden
4096), once per batch kind the attention kernel specialises on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvrun_cuda.fp8 import fp8_max
from kvrun_cuda.triton import awq, elementwise, fused_moe, paged_attention
from kvrun_cuda.triton.launch import Kernel

__all__ = [
    "AOT_FP8_CACHES",
    "AOT_TARGETS",
    "FP8_CACHE_TYPES",
    "KernelBuild",
    "compile_kernel",
    "fp8_kernel_builds",
    "kernel_builds",
]

# The targets the tests compile for: (Triton backend, architecture, warp size).
AOT_TARGETS: dict[str, GPUTarget] = {
    "sm_90": GPUTarget("cuda", 90, 32),
    "gfx942": GPUTarget("hip", "gfx942", 64),
}

# Pointer arguments whose element type is fixed, by name; every other pointer holds the
# activation dtype.
_TYPED_POINTERS = {
    "part_acc_ptr": "*fp32",
    "part_m_ptr": "*fp32",
    "part_l_ptr": "*fp32",
    "slot_ptr": "*i64",
    "pos_ptr": "*i64",
    "tables_ptr": "*i32",
    "seq_lens_ptr": "*i32",
    "query_start_ptr": "*i32",
    "qweight_ptr": "*i32",
    "qzeros_ptr": "*i32",
    # fused_moe's routing and alignment
    "ids_ptr": "*i64",
    "counts_ptr": "*i32",
    "cursor_ptr": "*i32",
    "ends_ptr": "*i32",
    "total_ptr": "*i32",
    "sorted_ptr": "*i32",
    "tile_experts_ptr": "*i32",
    "weight_ptr": "*fp32",
}
_FLOAT_SCALARS = {"eps", "scale_log2", "k_scale", "v_scale"}


@dataclass(frozen=True)
class KernelBuild:
    """One kernel specialisation to compile."""

    name: str  # e.g. "paged_attention[decode]"
    kernel: Kernel
    constexprs: dict[str, Any]  # the constexpr arguments' values
    num_warps: int = 4
    dtype: str = "fp16"  # Triton's name of the activation and cache dtype
    overrides: dict[str, str] = field(default_factory=dict)  # argument -> Triton type

    def signature(self) -> dict[str, str]:
        """Every argument's Triton type: pointers, i32 sizes and strides, fp32 scalars."""
        sig = {}
        for arg in self.kernel.arg_names:
            if arg in self.overrides:
                sig[arg] = self.overrides[arg]
            elif arg in self.constexprs:
                sig[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                sig[arg] = _TYPED_POINTERS.get(arg, f"*{self.dtype}")
            elif arg in _FLOAT_SCALARS:
                sig[arg] = "fp32"
            else:
                sig[arg] = "i32"
        return sig


def kernel_builds(dtype: str = "fp16") -> list[KernelBuild]:
    """Every kernel, in each specialisation the wrappers launch for a Llama-class model."""
    attn = paged_attention._paged_attention_kernel
    size = {"fp16": 2, "bf16": 2, "fp32": 4}[dtype]
    decode = paged_attention.paged_attention_config(32, 8, 128, 1, size)
    prefill = paged_attention.paged_attention_config(32, 8, 128, 512, size)
    # A batch of one decode on 8 kv heads: split over decode_splits(1, 8) programs each.
    split = paged_attention.paged_attention_config(
        32, 8, 128, 1, size, paged_attention.decode_splits(1, 8)
    )
    return [
        KernelBuild(
            "rms_norm",
            elementwise._rms_norm_kernel,
            {"HAS_RESIDUAL": False, "BLOCK": 4096},
            dtype=dtype,
        ),
        KernelBuild(
            "fused_add_rms_norm",
            elementwise._rms_norm_kernel,
            {"HAS_RESIDUAL": True, "BLOCK": 4096},
            dtype=dtype,
        ),
        KernelBuild(
            "rotary_embedding",
            elementwise._rotary_kernel,
            {"HALF": 64, "BLOCK_HALF": 64, "BLOCK_HQ": 32, "BLOCK_HK": 8},
            dtype=dtype,
            # The model's cos/sin cache is fp32 whatever the activations are.
            overrides={"cs_ptr": "*fp32"},
        ),
        KernelBuild("silu_and_mul", elementwise._silu_and_mul_kernel, {"BLOCK": 1024}, dtype=dtype),
        KernelBuild(
            "reshape_and_cache",
            elementwise._reshape_and_cache_kernel,
            {"BLOCK_H": 8, "BLOCK_D": 128, "QUANT": False, "FP8_MAX": elementwise.FP8_MAX},
            dtype=dtype,
        ),
        KernelBuild(
            "paged_attention[decode]",
            attn,
            {**decode.constexprs(), "DEQUANT": False},
            num_warps=decode.num_warps,
            dtype=dtype,
        ),
        KernelBuild(
            "paged_attention[prefill]",
            attn,
            {**prefill.constexprs(), "DEQUANT": False},
            num_warps=prefill.num_warps,
            dtype=dtype,
        ),
        KernelBuild(
            "paged_attention[decode-split]",
            attn,
            {**split.constexprs(), "DEQUANT": False},
            num_warps=split.num_warps,
            dtype=dtype,
        ),
        KernelBuild(
            "awq_dequantize",
            awq._awq_dequantize_kernel,
            {"BLOCK_K": awq.BLOCK_K, "BLOCK_N": awq.BLOCK_N},
            dtype=dtype,  # the scales'
            overrides={"out_ptr": "*fp32"},
        ),
        KernelBuild(
            "merge_splits",
            paged_attention._merge_splits_kernel,
            {"HEAD_DIM": 128, "D_PAD": 128, "SPLITS_PAD": split.num_splits, "TILE": split.tile},
            dtype=dtype,
        ),
        *_moe_builds(dtype),
    ]


def _moe_builds(dtype: str) -> list[KernelBuild]:
    """fused_moe's kernels for a Mixtral-shaped layer (8 experts, top-2), prefill tiles;
    the alignment's for 256 experts (DeepSeek-V3's count)."""
    gemm = fused_moe._grouped_gemm_kernel
    prefill = fused_moe.moe_config(4096, 8)
    tiles = {"BLOCK_M": prefill.block_m, "BLOCK_N": prefill.block_n, "BLOCK_K": prefill.block_k}
    ieee = dtype == "fp32"
    block_e = 256
    return [
        KernelBuild(
            "fused_moe[gate-up]",
            gemm,
            {**tiles, "TOP_K": 2, "GATED": True, "MUL_WEIGHT": False, "IEEE": ieee},
            dtype=dtype,
        ),
        KernelBuild(
            "fused_moe[down]",
            gemm,
            {**tiles, "TOP_K": 1, "GATED": False, "MUL_WEIGHT": True, "IEEE": ieee},
            dtype=dtype,
        ),
        KernelBuild("moe_align[count]", fused_moe._count_kernel, {"BLOCK": fused_moe.PAIR_BLOCK}),
        KernelBuild(
            "moe_align[offsets]",
            fused_moe._offsets_kernel,
            {"BLOCK_M": prefill.block_m, "BLOCK_E": block_e},
        ),
        KernelBuild(
            "moe_align[tile-experts]",
            fused_moe._tile_experts_kernel,
            {
                "BLOCK_M": prefill.block_m,
                "BLOCK_T": fused_moe.tiles_per_program(block_e),
                "BLOCK_E": block_e,
            },
        ),
        KernelBuild(
            "moe_align[scatter]", fused_moe._scatter_kernel, {"BLOCK": fused_moe.PAIR_BLOCK}
        ),
    ]


# Triton's names of the fp8 cache formats, and the torch dtype each one is.
FP8_CACHE_TYPES: dict[str, torch.dtype] = {
    "fp8e4nv": torch.float8_e4m3fn,  # OCP e4m3: NVIDIA, and AMD from gfx950
    "fp8e4b8": torch.float8_e4m3fnuz,  # e4m3 FNUZ: AMD MI300 (gfx94x), kvrun-rocm's there
}
# The fp8 cache formats each AOT target is compiled for: gfx942 in both, as kvrun-rocm
# stores fnuz there (Triton supports fp8e4b8 on AMD targets only) and an OCP cache
# still builds, converted in software.
AOT_FP8_CACHES: dict[str, tuple[str, ...]] = {
    "sm_90": ("fp8e4nv",),
    "gfx942": ("fp8e4nv", "fp8e4b8"),
}


def fp8_kernel_builds(dtype: str = "bf16", cache: str = "fp8e4nv") -> list[KernelBuild]:
    """The kernels that touch an fp8 (e4m3) KV cache, in their fp8 specialisations.

    ``cache`` is a key of FP8_CACHE_TYPES; the fnuz builds' names end in "-fnuz".
    """
    attn = paged_attention._paged_attention_kernel
    fp8 = f"*{cache}"
    saturation = fp8_max(FP8_CACHE_TYPES[cache])  # 448 or 240, as reshape_and_cache passes
    tag = "fp8" if cache == "fp8e4nv" else "fp8-fnuz"
    decode = paged_attention.paged_attention_config(32, 8, 128, 1)
    prefill = paged_attention.paged_attention_config(32, 8, 128, 512)
    caches = {"k_cache_ptr": fp8, "v_cache_ptr": fp8}
    return [
        KernelBuild(
            f"reshape_and_cache[{tag}]",
            elementwise._reshape_and_cache_kernel,
            {"BLOCK_H": 8, "BLOCK_D": 128, "QUANT": True, "FP8_MAX": saturation},
            dtype=dtype,
            overrides={"kc_ptr": fp8, "vc_ptr": fp8},
        ),
        KernelBuild(
            f"paged_attention[decode-{tag}]",
            attn,
            {**decode.constexprs(), "DEQUANT": True},
            dtype=dtype,
            overrides=caches,
        ),
        KernelBuild(
            f"paged_attention[prefill-{tag}]",
            attn,
            {**prefill.constexprs(), "DEQUANT": True},
            dtype=dtype,
            overrides=caches,
        ),
    ]


def compile_kernel(build: KernelBuild, target: GPUTarget) -> Any:
    """Compile one build for ``target``; returns Triton's CompiledKernel (see its ``asm``)."""
    source = ASTSource(build.kernel.jit, build.signature(), constexprs=build.constexprs)
    options = {"num_warps": build.num_warps, "enable_fp_fusion": True}
    return triton.compile(source, target=target, options=options)
