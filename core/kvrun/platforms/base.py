"""The Platform contract: everything a hardware plugin supplies to the core.

A hardware plugin is one distribution with one entry point in the group
``kvrun.platform_plugins``. The entry point is a zero-argument callable (the
*probe*) that returns the plugin's :class:`Platform` subclass, or its dotted path,
when the hardware is usable, and ``None`` or an :class:`Unavailable` carrying the
reason when it is not. A probe never raises for missing hardware.

The core constructs the selected class once per process with the frozen
environment snapshot and then only calls the members below. The scheduler, block
manager and sampler never see a Platform: they are device-neutral.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from kvrun.attention.base import AttentionBackend, AttentionLayerSpec, AttentionMetadata
from kvrun.errors import ConfigError, KvrunError
from kvrun.scheduling.capacity import blocks_needed, require_blocks

if TYPE_CHECKING:
    from kvrun.config import EngineConfig
    from kvrun.distributed.communicator import CustomAllReduce
    from kvrun.distributed.state import ProcessGroups
    from kvrun.envs import EnvSnapshot
    from kvrun.sampling.truncation import TopKTopPSampler
    from kvrun.scheduling.free_blocks import FreeBlockPolicy

__all__ = [
    "DecodeForward",
    "DecodeGraphRunner",
    "KVCachePlan",
    "KVCacheRequest",
    "ModelExecutor",
    "Platform",
    "Unavailable",
    "plan_exact_kv_blocks",
]


@dataclass(frozen=True)
class Unavailable:
    """What a probe returns when its hardware is not usable: falsy, with the reason."""

    reason: str

    def __bool__(self) -> bool:
        return False


@dataclass(frozen=True)
class KVCacheRequest:
    """What the engine asks the allocator for, derived from the model and config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int  # tokens per block
    dtype: torch.dtype  # the cache dtype the engine asks for
    max_model_len: int  # one sequence of this length must fit
    layer_shape: Callable[[int], tuple[int, ...]]  # num_blocks -> one layer's tensor shape
    model_bytes: int = 0  # weight bytes already resident, for platforms that budget a pool
    # Share of device memory this process may use (EngineArgs.gpu_memory_utilization).
    gpu_memory_utilization: float = 0.9
    # Peak bytes measure_peak_memory reported for the largest step (weights and
    # activations); None when the platform does not profile.
    peak_memory_bytes: int | None = None
    # Planes of num_kv_heads x head_dim values per token and layer: 2 (keys and values),
    # 1 for multi-head latent attention's single-plane cache (AttentionLayerSpec.kv_planes).
    kv_planes: int = 2
    # A model whose every layer has a sliding window of this many positions, its blocks
    # released as a sequence runs: one sequence then holds at most the blocks of one
    # step's span of max_chunk_tokens (kvrun.scheduling.capacity.blocks_needed).
    sliding_window: int | None = None
    max_chunk_tokens: int | None = None

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token takes across all layers, every plane (keys and values)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.kv_planes * self.num_layers * self.num_kv_heads * self.head_dim * elem

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes across all layers, every plane (keys and values)."""
        return self.block_size * self.bytes_per_token

    @property
    def min_blocks(self) -> int:
        """Blocks one sequence of max_model_len needs (at most at once, when windowed)."""
        return blocks_needed(
            self.max_model_len, self.block_size, self.sliding_window, self.max_chunk_tokens
        )


@dataclass(frozen=True)
class KVCachePlan:
    """The allocator's answer: how many blocks of which shape, and why."""

    num_blocks: int
    block_size: int
    dtype: torch.dtype
    # One layer's tensor shape; allocate() returns these. An executor whose K and V
    # tensors differ in shape reports (num_blocks, elements of one layer's K+V per block).
    layer_shape: tuple[int, ...]
    num_layers: int
    budget_bytes: int  # the budget the blocks were carved from
    reason: str  # one line for the start-up log: where the budget came from
    # Elements of padding after each entry's last dimension (cuda's 256-byte alignment of
    # latent entries, VLLM_CUDA_MEM_ALIGN_KV_CACHE): allocate_kv_cache then returns views
    # of layer_shape into storage whose last dimension is that much longer.
    entry_padding: int = 0

    @property
    def total_bytes(self) -> int:
        """Bytes of all layers' cache storage together (padding included)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        n = self.num_layers
        for d in self.layer_shape[:-1]:
            n *= d
        return n * (self.layer_shape[-1] + self.entry_padding) * elem


# The model's forward as a decode-graph runner calls it:
# (input_ids [N] int64, positions [N] int64, meta) -> hidden [N, hidden_size].
DecodeForward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


class DecodeGraphRunner(Protocol):
    """A platform's captured decode step (CUDA graphs and the like).

    Invariants: ``run`` returns the same hidden states as the eager forward of that
    batch, or None when it cannot run this batch (the engine then runs it eagerly).
    Rows it adds for padding write K/V only into the blocks the platform asked the
    engine to reserve (:meth:`Platform.reserved_kv_blocks`), never into a request's.
    """

    def run(
        self,
        input_ids: torch.Tensor,  # [N] int64
        positions: torch.Tensor,  # [N] int64
        meta: AttentionMetadata,
    ) -> torch.Tensor | None:  # [N, hidden_size], or None: run eagerly
        ...


class ModelExecutor(ABC):
    """A whole-model executor, for graph compilers that run attention inside their graph.

    A platform that returns one from :meth:`Platform.model_executor` replaces the
    core's model, attention and KV-cache allocation; the scheduler, block manager and
    sampler still drive it unchanged.

    Invariants an executor keeps:
    - ``block_size`` equals the ``config.block_size`` it was built with (a platform
      whose compiled graph needs another block size sets it in ``check_config``).
    - ``init_kv_cache`` is called exactly once, before the first ``execute``. The
      executor allocates and owns every KV tensor; the returned plan's ``num_blocks``
      is what the block manager hands out, so every block id in 0..num_blocks-1 must
      be backed by storage in every layer. With ``num_blocks`` None it carves the
      blocks from its platform's budget; either way it refuses (ConfigError) a cache
      that cannot hold one sequence of ``max_model_len``.
    - ``execute`` reads and writes K/V only at the slots the block tables in ``meta``
      name: token ``p`` of a sequence lives in block ``block_tables[i, p // block_size]``
      at offset ``p % block_size``; positions below the chunk's start are already in
      the cache (earlier chunks or prefix-cache hits) and are never rewritten.
    - ``logits_indices`` may name any flat token rows, in any number (one per sampling
      request, or every row of a chunk for prompt logprobs); the result has one row per
      index, in that order.
    """

    block_size: int  # tokens per KV block in the executor's cache

    @abstractmethod
    def init_kv_cache(self, num_blocks: int | None, max_model_len: int) -> KVCachePlan:
        """Allocate the executor's KV cache; ``num_blocks`` None = from the budget."""

    @abstractmethod
    def execute(
        self,
        input_ids: torch.Tensor,  # [T] int64, the chunks' tokens back to back
        positions: torch.Tensor,  # [T] int64
        meta: Any,  # kvrun.attention.AttentionMetadata of this step
        logits_indices: torch.Tensor,  # [N] int64 flat token rows that need logits
    ) -> torch.Tensor:  # [N, vocab] float32 logits
        """Run one step, writing the chunks' K/V into the cache; logits of the rows asked."""


def plan_exact_kv_blocks(request: KVCacheRequest, num_blocks: int, why: str) -> KVCachePlan:
    """A plan of exactly ``num_blocks`` (``num_kv_blocks`` asked for, or a vendor's
    executor sizing its own cache), refused when it cannot hold one sequence."""
    require_blocks(
        num_blocks,
        block_size=request.block_size,
        max_model_len=request.max_model_len,
        holder=why,
        remedy="ask for more blocks or lower max_model_len",
        sliding_window=request.sliding_window,
        max_chunk_tokens=request.max_chunk_tokens,
    )
    return KVCachePlan(
        num_blocks=num_blocks,
        block_size=request.block_size,
        dtype=request.dtype,
        layer_shape=request.layer_shape(num_blocks),
        num_layers=request.num_layers,
        budget_bytes=num_blocks * request.bytes_per_block,
        reason=why,
    )


class Platform(ABC):
    """Base class for a hardware platform. Subclasses set the class attributes.

    Invariants:
    - ``name`` is the value of VLLM_TARGET_DEVICE that selects this platform.
    - ``attention_backends()`` is never empty and ``default_attention_backend`` is a key
      of it.
    - ``plan_kv_cache`` never plans more bytes than its budget, and refuses (raises
      :class:`kvrun.errors.ConfigError` with what to change) a budget that cannot hold
      one sequence of max_model_len.
    - ``allocate_kv_cache(plan)`` returns ``num_layers`` tensors of exactly
      ``plan.layer_shape`` and ``plan.dtype`` on ``self.device``.
    - ``ops()`` overrides only names in :data:`kvrun.ops.OP_NAMES`, each numerically
      equal to the reference op within tolerance.
    """

    name: ClassVar[str]  # "cpu", "cuda", ...
    device_type: ClassVar[str]  # torch device type
    # The communicator tensor/pipeline-parallel ranks use: a torch.distributed backend
    # ("gloo" on cpu, "nccl" on cuda, "nccl" = RCCL on rocm, "xla" on tpu).
    dist_backend: ClassVar[str]
    # Why tensor/pipeline parallelism does not run on this platform; "" = it does
    # (kvrun.distributed.worker refuses world_size > 1 with this reason).
    parallel_unsupported: ClassVar[str] = ""
    priority: ClassVar[int] = 0  # higher wins when VLLM_TARGET_DEVICE is unset
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32,)
    default_attention_backend: ClassVar[str] = "REFERENCE"
    default_block_size: ClassVar[int] = 16  # tokens per KV block when the user sets none
    # KV-cache dtypes this platform stores besides the model dtype (fp8 formats).
    kv_cache_dtypes: ClassVar[tuple[torch.dtype, ...]] = ()
    # Variables this platform acts on beyond what kvrun.env_effects.EFFECTS says (a
    # vendor's platform that reads, say, VLLM_CPU_KVCACHE_SPACE): not named at start as
    # having no effect here.
    honoured_variables: ClassVar[frozenset[str]] = frozenset()
    # GGUF types (kvrun.quantization.EXECUTABLE_GGUF_TYPES) whose matrices this platform's
    # prepare_linear / linear / embedding take as kvrun.quantization.QuantizedMatrix
    # (quantization="gguf"); empty: such a run is refused.
    quantized_gguf_types: ClassVar[frozenset[str]] = frozenset()
    # Whether prepare_linear / linear take AWQ rows (kvrun.quantization.awq_qtype) as
    # QuantizedMatrix (quantization="awq"); False: AWQ checkpoints are dequantized at load.
    quantized_awq: ClassVar[bool] = False

    def __init__(self, env: EnvSnapshot) -> None:
        self.env = env

    # identity -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device(self.device_type)

    def default_dtype(self) -> torch.dtype:
        """The dtype ``dtype="auto"`` resolves to: the fastest this hardware runs."""
        return self.supported_dtypes[0]

    def setup_process(self, rank: int = 0) -> None:  # noqa: B027 - optional hook
        """Per-process set-up before the model loads (threads, affinity, device index).

        ``rank`` is the process's local rank (0 for a single process).
        """

    def describe(self) -> str:
        """One line for the start-up log."""
        return f"{self.name} ({self.device})"

    # attention ------------------------------------------------------------------
    def attention_backends(self) -> Mapping[str, type[AttentionBackend]]:
        """The backends this platform offers, by VLLM_ATTENTION_BACKEND name."""
        from kvrun.attention.reference import ReferenceAttention

        return {ReferenceAttention.name: ReferenceAttention}

    def attention_backend(self, name: str | None, spec: AttentionLayerSpec) -> AttentionBackend:
        """The backend named (VLLM_ATTENTION_BACKEND), or this platform's default."""
        backends = self.attention_backends()
        chosen = name or self.default_attention_backend
        if chosen not in backends:
            raise ConfigError(
                f"VLLM_ATTENTION_BACKEND={chosen!r} is not offered by the {self.name} platform; "
                f"valid backends are: {', '.join(sorted(backends))}"
            )
        return backends[chosen](spec)

    # KV cache -------------------------------------------------------------------
    def resolve_kv_cache_dtype(self, name: str, model_dtype: torch.dtype) -> torch.dtype | None:
        """The cache dtype for ``kv_cache_dtype=name``; None = the model dtype.

        A ConfigError, naming what this platform stores, for a dtype it cannot store. A
        platform may override this to store a named format in its hardware's own variant
        (kvrun-rocm stores fp8 e4m3 as ``float8_e4m3fnuz`` on MI300); it returns one of
        ``kv_cache_dtypes``, and the engine allocates the cache in it and passes it to the
        attention backend as ``AttentionLayerSpec.kv_cache_dtype``. Called after
        :meth:`setup_process`, so the device may be queried.
        """
        from kvrun.config import KV_CACHE_DTYPES

        if name == "auto":
            return None
        dtype = KV_CACHE_DTYPES[name]  # EngineArgs validated the name
        if dtype not in self.kv_cache_dtypes:
            accepted = [n for n, d in KV_CACHE_DTYPES.items() if d in self.kv_cache_dtypes]
            raise ConfigError(
                f"kv_cache_dtype={name!r} is not supported on the {self.name} platform; "
                f"supported: {', '.join(['auto', *accepted])}"
            )
        return None if dtype == model_dtype else dtype

    def measure_peak_memory(self, run_dummy_forward: Callable[[], None]) -> int | None:
        """Peak device bytes while ``run_dummy_forward`` runs the largest step; None = no
        profiling (the default runs nothing).

        Called once, after the weights load and before the KV cache is planned, only when
        the user gave no num_kv_blocks; the value reaches :meth:`kv_cache_budget` as
        ``request.peak_memory_bytes``.
        """
        return None

    def discard_calibration(self) -> None:  # noqa: B027 - optional hook
        """Forget what attention backends measured from dummy tokens; the default has
        nothing to forget.

        The engine calls it after :meth:`kvrun.engine.llm_engine.LLMEngine.warm_up`, whose
        steps write the real cache: a backend that calibrates on a layer's first write
        (kvrun-cuda's fp8 KV scales) then calibrates on the first real request, as it
        would have without the warm-up. (A platform that profiles calls it itself after
        the dummy forward of :meth:`measure_peak_memory`.)
        """

    def reserved_kv_blocks(self, config: EngineConfig) -> int:
        """KV blocks the engine keeps out of the block manager for this platform's own use
        (padding rows of captured decode graphs); they are the highest block ids."""
        return 0

    def custom_all_reduce(
        self, groups: ProcessGroups, dtype: torch.dtype
    ) -> tuple[CustomAllReduce | None, str]:
        """A faster all-reduce than ``dist_backend``'s for this rank's tensor-parallel
        group (activations of ``dtype``), or None; and the reason, which the worker logs.

        Called once by every rank of the group right after the groups form (so an
        implementation may run collectives on ``groups.tp_group`` to agree), and not at
        all under ``disable_custom_all_reduce``. Every rank must return the same choice.
        """
        return None, f"the {self.name} platform's all-reduce is {self.dist_backend}'s"

    def fused_decoder(
        self, model: Any, kv_caches: list[torch.Tensor], config: EngineConfig
    ) -> DecodeGraphRunner | None:
        """A kernel of this platform that runs a whole decode step of ``model`` in one call,
        tried before the decode graphs and the eager forward; None (the default) = none.

        Called once, after the KV cache is allocated, whatever ``enforce_eager`` says: it is
        a kernel, not a captured graph. ``model`` is the core model object; a platform reads
        only models whose layout it knows (:class:`kvrun.models.llama.LlamaForCausalLM`
        documents the attributes it keeps for this) and returns None for any other. The
        runner keeps the :class:`DecodeGraphRunner` invariants: the eager forward's hidden
        states, or None for a batch it does not take.
        """
        return None

    def decode_graph_runner(
        self, forward: DecodeForward, config: EngineConfig, pad_slot: int
    ) -> DecodeGraphRunner | None:
        """A captured decode step the model runner tries before its eager forward; None =
        always eager.

        Called once, after the KV cache is allocated (and the model compiled), with the
        forward over that cache. ``pad_slot`` is the first cache slot of the first reserved
        block; it is meaningful only when :meth:`reserved_kv_blocks` asked for one.
        """
        return None

    @abstractmethod
    def kv_cache_budget(self, request: KVCacheRequest) -> tuple[int, str]:
        """Bytes available for the KV cache, and one line saying where that came from."""

    def plan_kv_cache(self, request: KVCacheRequest) -> KVCachePlan:
        budget, why = self.kv_cache_budget(request)
        num_blocks = budget // request.bytes_per_block
        need = request.min_blocks * request.bytes_per_block
        require_blocks(
            num_blocks,
            block_size=request.block_size,
            max_model_len=request.max_model_len,
            holder=f"the {self.name} KV-cache budget of {budget / 2**30:.3f} GiB ({why})",
            remedy=f"raise the budget (to {need / 2**30:.3f} GiB) or lower max_model_len",
            sliding_window=request.sliding_window,
            max_chunk_tokens=request.max_chunk_tokens,
        )
        return KVCachePlan(
            num_blocks=num_blocks,
            block_size=request.block_size,
            dtype=request.dtype,
            layer_shape=request.layer_shape(num_blocks),
            num_layers=request.num_layers,
            budget_bytes=budget,
            reason=why,
        )

    def allocate_kv_cache(self, plan: KVCachePlan, num_layers: int) -> list[torch.Tensor]:
        shape = plan.layer_shape
        if plan.entry_padding:  # views of padded storage: the last dimension's stride grows
            padded = (*shape[:-1], shape[-1] + plan.entry_padding)
            return [
                torch.zeros(padded, dtype=plan.dtype, device=self.device)[..., : shape[-1]]
                for _ in range(num_layers)
            ]
        return [torch.zeros(shape, dtype=plan.dtype, device=self.device) for _ in range(num_layers)]

    # kernels --------------------------------------------------------------------
    def ops(self) -> Mapping[str, Callable[..., Any]]:
        """Kernels this platform accelerates, by op name; the rest use the reference."""
        return {}

    def model_executor(self, config: EngineConfig) -> ModelExecutor | None:
        """A whole-model executor for graph compilers; None runs the core's model.

        Called once, with the config ``check_config`` returned; when it returns an
        executor the engine builds no core model and allocates no KV cache of its own.
        """
        return None

    # sampling -------------------------------------------------------------------------
    def top_k_top_p_sampler(self) -> TopKTopPSampler | None:
        """A device kernel for top-k/top-p sampling; None = the core's torch sampler.

        See :data:`kvrun.sampling.truncation.TopKTopPSampler` for the contract.
        """
        return None

    # KV block accounting ----------------------------------------------------------
    def free_block_policy(self, config: EngineConfig) -> FreeBlockPolicy | None:
        """The order in which the block manager hands out free KV blocks; None = core FIFO.

        Called once, with the config ``check_config`` returned. The policy must keep the
        invariants of :class:`kvrun.scheduling.free_blocks.FreeBlockPool`: it only orders
        the clean free blocks (never invents, duplicates or withholds an id), and its
        order is deterministic. It changes which block ids a sequence gets, never how many
        or when, so a platform whose kernels need a compact id range (Gaudi's contiguous
        paged attention) can ask for it without changing scheduling decisions.
        """
        return None

    # configuration --------------------------------------------------------------
    def check_config(self, config: EngineConfig) -> tuple[EngineConfig, list[str]]:
        """An adjusted copy of the engine config and one reason per adjustment."""
        if config.dtype not in self.supported_dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.supported_dtypes)
            raise KvrunError(
                f"dtype {str(config.dtype).removeprefix('torch.')} is not supported on the "
                f"{self.name} platform; supported: {names}"
            )
        return config, []
