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
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvrun.attention.base import AttentionBackend, AttentionLayerSpec
from kvrun.errors import ConfigError, KvrunError

if TYPE_CHECKING:
    from kvrun.config import EngineConfig
    from kvrun.envs import EnvSnapshot

__all__ = [
    "KVCachePlan",
    "KVCacheRequest",
    "ModelExecutor",
    "Platform",
    "Unavailable",
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

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes across all layers, keys and values."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    @property
    def min_blocks(self) -> int:
        """Blocks one sequence of max_model_len needs."""
        return -(-self.max_model_len // self.block_size)


@dataclass(frozen=True)
class KVCachePlan:
    """The allocator's answer: how many blocks of which shape, and why."""

    num_blocks: int
    block_size: int
    dtype: torch.dtype
    layer_shape: tuple[int, ...]  # one layer's tensor shape; allocate() returns these
    num_layers: int
    budget_bytes: int  # the budget the blocks were carved from
    reason: str  # one line for the start-up log: where the budget came from

    @property
    def total_bytes(self) -> int:
        """Bytes of all layers' cache tensors together."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        n = self.num_layers
        for d in self.layer_shape:
            n *= d
        return n * elem


class ModelExecutor(ABC):
    """A whole-model executor, for graph compilers that run attention inside their graph.

    A platform that returns one from :meth:`Platform.model_executor` replaces the
    core's model and attention; the scheduler, block manager and sampler still drive
    it, so the executor must read K/V positions from the block tables it is given.
    """

    @abstractmethod
    def execute(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: Any,  # kvrun.attention.AttentionMetadata
        logits_indices: torch.Tensor,  # [B'] which flat tokens need logits
    ) -> torch.Tensor:  # [B', vocab] float32 logits
        """Run one step and return the logits of the selected tokens."""


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
    dist_backend: ClassVar[str]  # torch.distributed backend: "gloo", "nccl", ...
    priority: ClassVar[int] = 0  # higher wins when VLLM_TARGET_DEVICE is unset
    supported_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32,)
    default_attention_backend: ClassVar[str] = "REFERENCE"

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
    @abstractmethod
    def kv_cache_budget(self, request: KVCacheRequest) -> tuple[int, str]:
        """Bytes available for the KV cache, and one line saying where that came from."""

    def plan_kv_cache(self, request: KVCacheRequest) -> KVCachePlan:
        budget, why = self.kv_cache_budget(request)
        num_blocks = budget // request.bytes_per_block
        if num_blocks < request.min_blocks:
            need = request.min_blocks * request.bytes_per_block
            raise ConfigError(
                f"the {self.name} KV-cache budget of {budget / 2**30:.3f} GiB ({why}) holds "
                f"{num_blocks} blocks of {request.block_size} tokens, but one sequence of "
                f"max_model_len={request.max_model_len} needs {request.min_blocks} blocks "
                f"({need / 2**30:.3f} GiB); raise the budget or lower max_model_len"
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
        return [
            torch.zeros(plan.layer_shape, dtype=plan.dtype, device=self.device)
            for _ in range(num_layers)
        ]

    # kernels --------------------------------------------------------------------
    def ops(self) -> Mapping[str, Callable[..., Any]]:
        """Kernels this platform accelerates, by op name; the rest use the reference."""
        return {}

    def model_executor(self, config: EngineConfig) -> ModelExecutor | None:
        """A whole-model executor for graph compilers; None runs the core's model."""
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
