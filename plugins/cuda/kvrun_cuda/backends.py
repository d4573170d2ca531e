"""Which attention backend runs: the table of what each needs, and the choice.

Device-neutral on purpose: the choice only asks whether a package can be found and
whether the model's head size and dtype are in the backend's table, so the errors
and the automatic choice are tested on machines without a GPU. The ROCm plugin
reuses :func:`choose_attention_backend` with its own table.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvrun.attention.base import AttentionBackend, AttentionLayerSpec
from kvrun.errors import ConfigError

__all__ = [
    "CUDA_BACKENDS",
    "FLASHINFER",
    "FP8_BACKENDS",
    "REFERENCE",
    "REFERENCE_FP8",
    "TRITON_ATTN",
    "TRITON_FP8",
    "XFORMERS",
    "BackendChoice",
    "BackendEntry",
    "build_backend",
    "choose_attention_backend",
    "choose_fp8_backend",
    "dtype_name",
    "module_installed",
    "refusals",
]

_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class BackendEntry:
    """One attention backend a platform offers and what it needs to run."""

    name: str  # the VLLM_ATTENTION_BACKEND spelling
    target: str  # "module:Class", imported only once chosen
    module: str | None  # import name that must be findable; None: needs nothing extra
    install: str  # how to get `module`: the pip requirement
    head_sizes: tuple[int, ...] | range | None  # head sizes its kernels are built for; None: any
    dtypes: tuple[torch.dtype, ...]  # activation dtypes it runs
    # constructor keyword -> EnvSnapshot attribute, passed when the platform builds it
    env_options: tuple[tuple[str, str], ...] = ()

    def load(self) -> type[AttentionBackend]:
        module_name, _, cls_name = self.target.partition(":")
        cls: type[AttentionBackend] = getattr(importlib.import_module(module_name), cls_name)
        return cls


# FlashInfer's prebuilt and JIT kernels cover these head sizes; fp16/bf16 activations.
FLASHINFER = BackendEntry(
    name="FLASHINFER",
    target="kvrun_cuda.flashinfer_attn:FlashInferAttention",
    module="flashinfer",
    install="flashinfer-python",
    head_sizes=(64, 128, 256),
    dtypes=_HALF,
    env_options=(("force_tensor_cores", "VLLM_FLASHINFER_FORCE_TENSOR_CORES"),),
)
# xFormers' paged (split-K) forward ops are built for these head sizes.
XFORMERS = BackendEntry(
    name="XFORMERS",
    target="kvrun_cuda.xformers_attn:XFormersAttention",
    module="xformers",
    install="xformers",
    head_sizes=(64, 80, 96, 112, 128, 256),
    dtypes=_HALF,
)
# Our own kernels pad the head dimension to a power of two inside the kernel, up to
# kvrun_cuda.triton.attention.MAX_HEAD_DIM (not imported here: that would import Triton).
TRITON_ATTN = BackendEntry(
    name="TRITON_ATTN",
    target="kvrun_cuda.triton.attention:TritonAttention",
    module="triton",
    install="triton",
    head_sizes=range(1, 257),
    dtypes=(*_HALF, torch.float32),
)
# The core's oracle: always runnable, never fast; chosen automatically only as a last resort.
REFERENCE = BackendEntry(
    name="REFERENCE",
    target="kvrun.attention.reference:ReferenceAttention",
    module=None,
    install="",
    head_sizes=None,
    dtypes=(*_HALF, torch.float32),
)
# In order of preference for the automatic choice.
CUDA_BACKENDS: tuple[BackendEntry, ...] = (FLASHINFER, XFORMERS, TRITON_ATTN, REFERENCE)

# The backends that read an fp8 KV cache, with the per-layer scale divisors of the env.
_FP8_SCALE_OPTIONS = (
    ("k_scale_constant", "K_SCALE_CONSTANT"),
    ("v_scale_constant", "V_SCALE_CONSTANT"),
)
# Our Triton kernels with measured scales; the user names it TRITON_ATTN, as without fp8.
TRITON_FP8 = BackendEntry(
    name="TRITON_ATTN",
    target="kvrun_cuda.triton.attention:TritonFp8Attention",
    module="triton",
    install="triton",
    head_sizes=TRITON_ATTN.head_sizes,
    dtypes=TRITON_ATTN.dtypes,
    env_options=_FP8_SCALE_OPTIONS,
)
# The torch path over the fp8 cache (the oracle): always runnable, the fallback.
REFERENCE_FP8 = BackendEntry(
    name="REFERENCE_FP8",
    target="kvrun_cuda.fp8:Fp8KVCacheAttention",
    module=None,
    install="",
    head_sizes=None,
    dtypes=REFERENCE.dtypes,
    env_options=_FP8_SCALE_OPTIONS,
)
# In order of preference when the KV cache is fp8 (CUDA and ROCm alike).
FP8_BACKENDS: tuple[BackendEntry, ...] = (TRITON_FP8, REFERENCE_FP8)


@dataclass(frozen=True)
class BackendChoice:
    """The chosen backend, whether the user named it, and what was passed over and why."""

    entry: BackendEntry
    explicit: bool  # True when VLLM_ATTENTION_BACKEND (or attention_backend=) named it
    passed_over: tuple[tuple[str, str], ...]  # (backend name, why it cannot run), in order

    def log_line(self, platform: str, kv_cache: torch.dtype | None = None) -> str:
        """One line for the start-up log; ``kv_cache`` names a cache dtype (fp8) if given."""
        what = f"attention backend {self.entry.name}"
        if kv_cache is not None:
            what += f" over a {dtype_name(kv_cache)} KV cache"
        if self.explicit:
            return f"{platform}: {what} (asked for)"
        line = f"{platform}: {what} chosen automatically"
        if self.passed_over:
            skipped = "; ".join(f"{name}: {why}" for name, why in self.passed_over)
            line += f", passed over {skipped}"
        return line


def module_installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (no CUDA initialisation)."""
    return importlib.util.find_spec(module) is not None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def refusals(
    entry: BackendEntry,
    layer: AttentionLayerSpec,
    dtype: torch.dtype | None,
    installed: Callable[[str], bool] = module_installed,
) -> list[str]:
    """Every reason ``entry`` cannot run this layer; empty when it can.

    ``dtype`` None skips the dtype check (a spec built without the model dtype; the
    platform's check_config repeats the check once the dtype is resolved).
    """
    reasons: list[str] = []
    if entry.module is not None and not installed(entry.module):
        reasons.append(
            f"{entry.install} is not installed (module {entry.module!r} not found; "
            f"pip install {entry.install})"
        )
    if entry.head_sizes is not None and layer.head_dim not in entry.head_sizes:
        sizes = (
            f"{entry.head_sizes.start}..{entry.head_sizes.stop - 1}"
            if isinstance(entry.head_sizes, range)
            else ", ".join(map(str, entry.head_sizes))
        )
        reasons.append(f"head size {layer.head_dim} is not supported (supported: {sizes})")
    if dtype is not None and dtype not in entry.dtypes:
        names = ", ".join(dtype_name(d) for d in entry.dtypes)
        reasons.append(f"dtype {dtype_name(dtype)} is not supported (supported: {names})")
    return reasons


def choose_attention_backend(
    requested: str | None,
    layer: AttentionLayerSpec,
    dtype: torch.dtype | None,
    offered: Sequence[BackendEntry],
    platform: str,
    installed: Callable[[str], bool] = module_installed,
) -> BackendChoice:
    """The backend named by ``requested``, or the first of ``offered`` that can run.

    A named backend that cannot run is a :class:`ConfigError` listing every reason:
    never a silent fallback to another backend.
    """
    by_name = {entry.name: entry for entry in offered}
    if requested is not None:
        entry = by_name.get(requested.strip().upper())
        if entry is None:
            raise ConfigError(
                f"VLLM_ATTENTION_BACKEND={requested!r} is not offered by the {platform} "
                f"platform; valid backends are: {', '.join(sorted(by_name))}"
            )
        reasons = refusals(entry, layer, dtype, installed)
        if reasons:
            raise ConfigError(
                f"VLLM_ATTENTION_BACKEND={entry.name} cannot run on the {platform} platform: "
                f"{'; '.join(reasons)}; unset VLLM_ATTENTION_BACKEND to let kvrun choose"
            )
        return BackendChoice(entry, explicit=True, passed_over=())
    passed: list[tuple[str, str]] = []
    for entry in offered:
        reasons = refusals(entry, layer, dtype, installed)
        if not reasons:
            return BackendChoice(entry, explicit=False, passed_over=tuple(passed))
        passed.append((entry.name, "; ".join(reasons)))
    # Our own invariant: every platform table ends in a backend that always runs.
    raise AssertionError(f"no attention backend of {platform} can run: {passed}")


def choose_fp8_backend(
    requested: str | None,
    layer: AttentionLayerSpec,
    offered: Sequence[BackendEntry],
    platform: str,
    installed: Callable[[str], bool] = module_installed,
) -> BackendChoice:
    """:func:`choose_attention_backend` over the backends that read an fp8 cache.

    A named backend that cannot read one (FLASHINFER, REFERENCE, ...) is refused with
    the fp8 backends listed, rather than as a backend the platform does not offer.
    """
    names = sorted({entry.name for entry in offered})
    if requested is not None and requested.strip().upper() not in names:
        raise ConfigError(
            f"VLLM_ATTENTION_BACKEND={requested!r} cannot read an fp8 KV cache on the "
            f"{platform} platform; with kv_cache_dtype fp8 the backends are "
            f"{', '.join(names)}: unset VLLM_ATTENTION_BACKEND, name one of those, or use "
            "kv_cache_dtype=auto"
        )
    return choose_attention_backend(requested, layer, layer.dtype, offered, platform, installed)


def build_backend(entry: BackendEntry, layer: AttentionLayerSpec, env: Any) -> AttentionBackend:
    """Import the chosen class and construct it with its options from the env snapshot."""
    options = {kwarg: getattr(env, var) for kwarg, var in entry.env_options}
    return entry.load()(layer, **options)
