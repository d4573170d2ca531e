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

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvrun_cuda.triton import elementwise, paged_attention
from kvrun_cuda.triton.launch import Kernel

__all__ = [
    "AOT_TARGETS",
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
            "merge_splits",
            paged_attention._merge_splits_kernel,
            {"HEAD_DIM": 128, "D_PAD": 128, "SPLITS_PAD": split.num_splits, "TILE": split.tile},
            dtype=dtype,
        ),
    ]


def fp8_kernel_builds(dtype: str = "bf16") -> list[KernelBuild]:
    """The kernels that touch an fp8 (e4m3) KV cache, in their fp8 specialisations."""
    attn = paged_attention._paged_attention_kernel
    fp8 = "*fp8e4nv"
    decode = paged_attention.paged_attention_config(32, 8, 128, 1)
    prefill = paged_attention.paged_attention_config(32, 8, 128, 512)
    caches = {"k_cache_ptr": fp8, "v_cache_ptr": fp8}
    return [
        KernelBuild(
            "reshape_and_cache[fp8]",
            elementwise._reshape_and_cache_kernel,
            {"BLOCK_H": 8, "BLOCK_D": 128, "QUANT": True, "FP8_MAX": elementwise.FP8_MAX},
            dtype=dtype,
            overrides={"kc_ptr": fp8, "vc_ptr": fp8},
        ),
        KernelBuild(
            "paged_attention[decode-fp8]",
            attn,
            {**decode.constexprs(), "DEQUANT": True},
            dtype=dtype,
            overrides=caches,
        ),
        KernelBuild(
            "paged_attention[prefill-fp8]",
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
