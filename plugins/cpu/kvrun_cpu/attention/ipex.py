"""IPEX: paged attention on intel-extension-for-pytorch's CPU kernels.

Offered by the cpu platform only when ``intel_extension_for_pytorch`` imports beside the
installed torch (IPEX 2.8 runs on torch 2.8 only). Nothing here imports IPEX at module
level: :func:`ipex_status` does, when the platform first lists its backends.

The kernels are ``intel_extension_for_pytorch.llm.modules.PagedAttention``'s
``reshape_and_cache`` (write the step's K/V), ``single_query_cached_kv_attention`` (an
all-decode step) and ``flash_attn_varlen_func`` (any step with a prefill, chunked or
after a prefix hit: causal, aligned to the end of each request's context). They read
raw pointers with the layout ``[num_blocks, num_kv_heads, block_size, head_dim]`` for
each of K and V and do not check it: a wrong shape, dtype or stride reads or writes
outside the tensors and kills the process. So every call is preceded by
:func:`check_step`, which raises :class:`IpexLayoutError` naming the tensor, what it is
and what IPEX needs.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import re
import warnings
from typing import Any

import torch

from kvrun.attention.base import AttentionBackend, AttentionLayerSpec, AttentionMetadata
from kvrun.errors import ConfigError, KvrunError

__all__ = [
    "IPEX_DTYPES",
    "IPEX_INSTALL",
    "IpexAttention",
    "IpexLayoutError",
    "check_step",
    "ipex_status",
    "ipex_unavailable",
]

logger = logging.getLogger("kvrun.cpu")

IPEX_MODULE = "intel_extension_for_pytorch"
IPEX_DIST = "intel-extension-for-pytorch"
IPEX_INSTALL = (
    'pip install "torch==2.8.0" "intel-extension-for-pytorch==2.8.0" (IPEX pins its torch: '
    "2.8.x runs only on torch 2.8, so keep it in its own virtualenv, as `nox -s ipex` does)"
)
# Dtypes IPEX's CPU paged-attention kernels take, for the cache and the query alike.
IPEX_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
_LAYOUT = "[2, num_blocks, num_kv_heads, block_size, head_dim]"


class IpexLayoutError(KvrunError):
    """A tensor handed to the IPEX backend that its kernels would misread."""


def _major_minor(version: str) -> str:
    match = re.match(r"(\d+)\.(\d+)", version)
    return f"{match.group(1)}.{match.group(2)}" if match else version


def ipex_status() -> tuple[bool, str]:
    """Whether IPEX imports here, and one line saying which IPEX or why not.

    The torch version is compared before importing: IPEX's own check prints to stdout
    and then fails with an AttributeError (it calls ``os.exit``) on a mismatch.
    """
    if importlib.util.find_spec(IPEX_MODULE) is None:
        return False, f"{IPEX_MODULE} is not installed"
    try:
        version = importlib.metadata.version(IPEX_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if version != "unknown" and _major_minor(version) != _major_minor(torch.__version__):
        return False, (
            f"{IPEX_DIST} {version} needs torch {_major_minor(version)}.*, "
            f"but torch {torch.__version__} is installed"
        )
    try:
        # Its import-time warnings are its own business; keep them out of the caller's
        # warning filters (an "error" filter would otherwise turn IPEX off).
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            importlib.import_module(f"{IPEX_MODULE}.llm.modules")
    except Exception as exc:  # a broken native library raises anything; report it
        return False, f"importing {IPEX_MODULE} {version} failed: {type(exc).__name__}: {exc}"
    for w in caught:
        logger.debug("%s import warning: %s", IPEX_MODULE, w.message)
    return True, f"{IPEX_MODULE} {version}"


def ipex_unavailable(reason: str) -> ConfigError:
    """The error for VLLM_ATTENTION_BACKEND=IPEX where IPEX cannot be used."""
    return ConfigError(
        f"VLLM_ATTENTION_BACKEND='IPEX' needs intel-extension-for-pytorch, which the cpu "
        f"platform cannot use here: {reason}. Install it with {IPEX_INSTALL}; or choose "
        "TORCH_SDPA or REFERENCE"
    )


def _describe(t: torch.Tensor) -> str:
    dtype = str(t.dtype).removeprefix("torch.")
    return f"shape {tuple(t.shape)}, dtype {dtype}, stride {t.stride()}"


def _fail(what: str, got: str, need: str) -> IpexLayoutError:
    return IpexLayoutError(f"IPEX attention: {what} is {got}; the IPEX kernels need {need}")


def _check_index(name: str, t: torch.Tensor, dim: int, length: int | None) -> None:
    """An int32 index tensor of ``dim`` dims, contiguous (the kernels walk it by pointer)."""
    ok = t.dim() == dim and t.dtype == torch.int32 and t.is_contiguous()
    if ok and length is not None:
        ok = t.shape[0] == length
    if not ok:
        rows = "" if length is None else f" with {length} rows"
        raise _fail(name, _describe(t), f"a contiguous {dim}-D int32 tensor{rows}")


def _check_range(name: str, t: torch.Tensor, high: int, meaning: str) -> None:
    """Every value of ``t`` in [0, high): an index the kernel dereferences unchecked."""
    if t.numel() == 0:
        return
    low_v, high_v = (int(x) for x in torch.aminmax(t))
    if low_v < 0 or high_v >= high:
        raise IpexLayoutError(
            f"IPEX attention: {name} holds values from {low_v} to {high_v}; {meaning} must lie "
            f"in [0, {high})"
        )


def check_step(
    spec: AttentionLayerSpec,
    query: torch.Tensor,  # [T, num_heads, head_dim]
    key: torch.Tensor,  # [T, num_kv_heads, head_dim]
    value: torch.Tensor,  # [T, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, num_kv_heads, block_size, head_dim]
    meta: AttentionMetadata,
) -> None:
    """Raise IpexLayoutError unless every tensor is what the IPEX kernels read."""
    h, hk, d, bs = spec.num_heads, spec.num_kv_heads, spec.head_dim, meta.block_size
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[2:] != (hk, bs, d):
        need = f"{_LAYOUT} = [2, *, {hk}, {bs}, {d}] (IpexAttention.kv_cache_shape)"
        raise _fail("the KV cache", _describe(kv_cache), need)
    if not kv_cache.is_contiguous():
        raise _fail("the KV cache", _describe(kv_cache), f"a contiguous {_LAYOUT} tensor")
    if kv_cache.dtype not in IPEX_DTYPES:
        names = ", ".join(str(x).removeprefix("torch.") for x in IPEX_DTYPES)
        raise _fail("the KV cache", _describe(kv_cache), f"one of the dtypes {names}")
    if kv_cache.device.type != "cpu":
        raise _fail("the KV cache", f"on {kv_cache.device}", "CPU tensors")
    t = meta.num_tokens
    for name, x, heads in (("query", query, h), ("key", key, hk), ("value", value, hk)):
        if (
            x.shape != (t, heads, d)
            or x.dtype != kv_cache.dtype
            or x.device != kv_cache.device
            or not x.is_contiguous()
        ):
            cache_dtype = str(kv_cache.dtype).removeprefix("torch.")
            need = f"a contiguous ({t}, {heads}, {d}) tensor in the cache's dtype {cache_dtype}"
            raise _fail(name, f"{_describe(x)} on {x.device}", need)
    _check_metadata(meta, num_blocks=kv_cache.shape[1])


def _check_metadata(meta: AttentionMetadata, num_blocks: int) -> None:
    t, b, bs = meta.num_tokens, meta.num_seqs, meta.block_size
    q_lens, s_lens = list(meta.query_lens), list(meta.seq_lens_host)
    if b == 0 or len(s_lens) != b or sum(q_lens) != t:
        raise IpexLayoutError(
            f"IPEX attention: the metadata has {b} query lengths summing to {sum(q_lens)} and "
            f"{len(s_lens)} context lengths, for {t} tokens; it needs one of each per request "
            f"(at least one), the query lengths summing to {t}"
        )
    if any(not 1 <= q <= s for q, s in zip(q_lens, s_lens, strict=True)):
        raise IpexLayoutError(
            f"IPEX attention: query lengths {q_lens} against context lengths {s_lens}; each "
            "request needs 1 <= query length <= context length"
        )
    if meta.max_query_len != max(q_lens) or meta.max_seq_len != max(s_lens):
        raise IpexLayoutError(
            f"IPEX attention: max_query_len {meta.max_query_len} and max_seq_len "
            f"{meta.max_seq_len} for query lengths {q_lens} and context lengths {s_lens}; "
            "they must be the longest of each (the kernels size their buffers by them)"
        )
    slots = meta.slot_mapping
    if slots.dim() != 1 or slots.shape[0] != t or slots.dtype not in (torch.int32, torch.int64):
        raise _fail("slot_mapping", _describe(slots), f"a 1-D int32 or int64 tensor of {t} slots")
    _check_range("slot_mapping", slots, num_blocks * bs, "a cache slot")
    _check_index("query_start_loc", meta.query_start_loc, 1, b + 1)
    _check_index("seq_lens", meta.seq_lens, 1, b)
    _check_index("block_tables", meta.block_tables, 2, b)
    # The kernels index query rows and table columns by these values, unchecked.
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    if meta.query_start_loc.tolist() != starts or meta.seq_lens.tolist() != s_lens:
        raise IpexLayoutError(
            f"IPEX attention: query_start_loc {meta.query_start_loc.tolist()} and seq_lens "
            f"{meta.seq_lens.tolist()} disagree with the host lengths (query starts {starts}, "
            f"context lengths {s_lens})"
        )
    width = meta.block_tables.shape[1] * bs
    if max(s_lens) > width:
        raise IpexLayoutError(
            f"IPEX attention: a context of {max(s_lens)} tokens does not fit block tables of "
            f"{meta.block_tables.shape[1]} blocks of {bs} tokens"
        )
    _check_range("block_tables", meta.block_tables, num_blocks, "a block id")


class IpexAttention(AttentionBackend):
    """Paged attention on IPEX's CPU kernels; K and V each ``[num_blocks, Hk, bs, D]``.

    One call per layer and step: an all-decode step runs IPEX's single-query kernel,
    any other step its varlen flash kernel over the paged cache (decodes are queries of
    length one there). Each request attends only to its own blocks, through its row of
    the block table.
    """

    name = "IPEX"

    def __init__(self, spec: AttentionLayerSpec) -> None:
        super().__init__(spec)
        available, reason = ipex_status()
        if not available:
            raise ipex_unavailable(reason)
        modules = importlib.import_module(f"{IPEX_MODULE}.llm.modules")
        self._ops: Any = modules.PagedAttention
        group = spec.num_heads // spec.num_kv_heads
        if group * spec.num_kv_heads != spec.num_heads:
            raise ConfigError(
                f"the IPEX attention backend needs num_heads ({spec.num_heads}) to be a "
                f"multiple of num_kv_heads ({spec.num_kv_heads})"
            )
        # [num_heads] int32: the kv head each query head reads (grouped-query).
        self._head_mapping = torch.arange(spec.num_heads, dtype=torch.int32) // group

    @staticmethod
    def kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (2, num_blocks, num_kv_heads, block_size, head_dim)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        # The model hands views of one fused projection; the kernels read rows by pointer.
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        check_step(self.spec, query, key, value, kv_cache, meta)
        key_cache, value_cache = kv_cache[0], kv_cache[1]  # [NB, Hk, bs, D], contiguous
        slots = meta.slot_mapping.to(torch.int32)
        self._ops.reshape_and_cache(key, value, key_cache, value_cache, slots)
        out = torch.empty_like(query)
        scale = self.spec.scale
        if meta.is_all_decode:
            self._ops.single_query_cached_kv_attention(
                out,
                query,
                key_cache,
                value_cache,
                self._head_mapping,
                scale,
                meta.block_tables,
                meta.seq_lens,
                meta.block_size,
                meta.max_seq_len,
                None,  # no ALiBi
            )
            return out
        # [B+1] int32: where each request's context starts in a flat run of contexts.
        cu_kv = torch.zeros(meta.num_seqs + 1, dtype=torch.int32)
        torch.cumsum(meta.seq_lens, 0, dtype=torch.int32, out=cu_kv[1:])
        self._ops.flash_attn_varlen_func(
            out,
            query,
            key_cache,
            value_cache,
            meta.query_start_loc,
            cu_kv,
            meta.max_query_len,
            meta.max_seq_len,
            scale,
            True,  # causal, aligned to the end of each context: the new tokens come last
            meta.block_tables,
            None,  # no ALiBi
        )
        return out
