"""One rank of a tensor/pipeline-parallel engine: its shard of the model and of the KV
cache, in its own process.

An executor (kvrun.executor) starts one process per rank and calls, on every rank, in
this order: ``Worker(args, env, spec)``, :meth:`Worker.init_distributed`,
:meth:`Worker.load_model`, :meth:`Worker.kv_cache_blocks` (each rank's own count),
:meth:`Worker.init_kv_cache` with the smallest count over the ranks, then
:meth:`Worker.execute` for each step with the same chunks on every rank, and
:meth:`Worker.close`. Every rank runs every step (the collectives need all of them);
only the driver rank (tp_rank 0 of the last stage) returns the step's logits.
An executor hands a step over as its message (:meth:`Worker.execute_step`): the LoRA
adapters it places in slots first (each rank reads the file and keeps its shard,
kvrun.lora.sharding), then its chunks, media included (every rank of a multimodal
model runs the replicated encoder on the media its chunks cover; with pipeline stages
only stage 0 encodes, every stage applies the M-RoPE positions).

The configuration is resolved exactly as the in-process builder does
(:func:`kvrun.engine.builder.resolve_engine_config`), so every rank and the engine
agree on it; the model is then built in the rank's own shape
(:meth:`~kvrun.distributed.parallel.ShardLayout.rank_config`) and loaded from this rank's
slices of the checkpoint (:func:`~kvrun.distributed.parallel.shard_weights`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from kvrun.attention.base import AttentionBackend, AttentionLayerSpec, with_latent_cache
from kvrun.config import EngineArgs, EngineConfig
from kvrun.distributed.communicator import Communicator, CustomAllReduce
from kvrun.distributed.layers import ModelParallel
from kvrun.distributed.parallel import ParallelConfig, ShardLayout, shard_weights, weight_plan
from kvrun.distributed.state import ProcessGroups, close_quietly, init_process_groups
from kvrun.engine.batch import StepLogits, build_batch
from kvrun.engine.builder import kv_cache_request, load_model_source, resolve_engine_config
from kvrun.engine.compilation import compile_function, compile_settings
from kvrun.engine.model_runner import ModelRunner
from kvrun.envs import read_env
from kvrun.errors import ConfigError
from kvrun.loader.safetensors_loader import ReadPlan
from kvrun.models.config import ModelConfig
from kvrun.ops import reference_ops
from kvrun.platforms import KVCacheRequest, plan_exact_kv_blocks
from kvrun.plugins import create_platform
from kvrun.quantization import plan_quantized_load
from kvrun.scheduling.output import ScheduledChunk

if TYPE_CHECKING:
    from kvrun.executor.messages import ExecuteStep
    from kvrun.lora.manager import LoraManager

__all__ = ["Worker", "WorkerSpec", "unsupported_reason"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """Where a rank stands; plain data (ints, strs), sent to its process as msgpack."""

    rank: int  # global rank = pp_rank * tensor_parallel_size + tp_rank
    local_rank: int  # rank on this machine (LOCAL_RANK)
    tensor_parallel_size: int
    pipeline_parallel_size: int
    init_method: str  # "tcp://HOST:PORT": the rendezvous (kvrun.distributed.state)

    @property
    def parallel(self) -> ParallelConfig:
        return ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size)


def unsupported_reason(model_cls: Any, architecture: str, parallel: ParallelConfig) -> str | None:
    """Why ``model_cls`` cannot run split as ``parallel`` asks; None when it can."""
    if parallel.world_size == 1:
        return None
    if getattr(model_cls, "supports_parallel", False):
        return None
    asked = (
        f"tensor_parallel_size>1 (asked {parallel.tensor_parallel_size})"
        if parallel.tensor_parallel_size > 1
        else f"pipeline_parallel_size>1 (asked {parallel.pipeline_parallel_size})"
    )
    return f"architecture {architecture} does not support {asked} yet"


class _StageProfile:
    """A non-last pipeline stage as make_profile_run sees it: its forward, no logits."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model.forward(*args, **kwargs)  # type: ignore[no-any-return]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.new_zeros(hidden.shape[0], 0)


class Worker:
    """One rank: its shard of the model and of the KV cache, in its own process."""

    def __init__(self, args: EngineArgs, env: Mapping[str, str], spec: WorkerSpec) -> None:
        self.args = args
        # the spec's local rank is this process's LOCAL_RANK (the platform picks its
        # device by it), whatever the engine's own environment said
        self.environ = {**env, "LOCAL_RANK": str(spec.local_rank)}
        self.env = read_env(self.environ)
        self.spec = spec
        self.parallel = spec.parallel
        self.pp_rank, self.tp_rank = self.parallel.coordinates(spec.rank)
        self.is_driver = spec.rank == self.parallel.driver_rank
        self.platform = create_platform(self.env)
        why = self.platform.parallel_unsupported
        if self.parallel.world_size > 1 and why:
            raise ConfigError(
                f"the {self.platform.name} platform does not support tensor/pipeline "
                f"parallelism: {why}"
            )
        self.groups: ProcessGroups | None = None
        self.config: EngineConfig | None = None
        self.layout: ShardLayout | None = None
        self.model: Any = None
        self.runner: ModelRunner | None = None
        self.kv_caches: list[torch.Tensor] = []
        self._rank_config: ModelConfig | None = None
        self._attention: AttentionBackend | None = None
        self._kv_request: KVCacheRequest | None = None
        self._custom_all_reduce: CustomAllReduce | None = None
        self.lora: LoraManager | None = None  # enable_lora: this rank's adapter slots

    # set-up ------------------------------------------------------------------------
    def init_distributed(self, timeout_s: float) -> None:
        """Set up this process (the platform's per-rank set-up: device index, the
        VLLM_CPU_OMP_THREADS_BIND cores of this local rank; the thread count is otherwise
        the executor's) and join the other ranks over the platform's backend; a rendezvous that fails within ``timeout_s`` raises
        :class:`kvrun.distributed.state.DistributedError` naming the rank and address."""
        self.platform.setup_process(self.spec.local_rank)
        self.groups = init_process_groups(
            self.parallel,
            self.spec.rank,
            self.spec.init_method,
            self.platform.dist_backend,
            timeout_s,
            self.environ,
        )

    def load_model(self) -> None:
        """Resolve the configuration as the builder does, then build and load this
        rank's shard (each rank reads only the layers of its stage and keeps only its
        slices of each tensor)."""
        assert self.groups is not None, "init_distributed first"
        args, env, platform = self.args, self.env, self.platform
        checkpoint, model_config, model_cls = load_model_source(args, env)
        why = unsupported_reason(model_cls, model_config.architecture, self.parallel)
        if why is not None:
            raise ConfigError(why)
        if _has_executor(platform):
            raise ConfigError(
                f"the {platform.name} platform runs a whole-model executor, which kvrun's "
                "workers do not drive"
            )
        config = resolve_engine_config(args, env, platform, model_config, checkpoint.source).config
        layout = ShardLayout.build(
            model_config, self.parallel, self.spec.rank, env.VLLM_PP_LAYER_PARTITION
        )
        rank_config = replace(
            layout.rank_config(model_config), serve_positions=config.max_model_len
        )
        attention = platform.attention_backend(
            config.attention_backend,
            AttentionLayerSpec(
                num_heads=rank_config.num_heads,
                num_kv_heads=rank_config.num_kv_heads,
                head_dim=rank_config.head_dim,
                scale=model_config.attention_scale,
                dtype=config.dtype,
                kv_cache_dtype=config.kv_cache_dtype,
                logit_softcap=model_config.attn_logit_softcap,
            ),
        )
        if rank_config.is_mla and rank_config.mla_mode == "absorbed":
            attention = with_latent_cache(attention, rank_config.kv_lora_rank)  # as the builder
        if config.quantization == "gguf" and self.parallel.world_size > 1:
            raise ConfigError(
                "quantization='gguf' with tensor/pipeline parallelism is not supported yet: "
                "GGUF blocks are not sliced across ranks; omit quantization (the weights are "
                "then dequantized at load)"
            )
        ops = reference_ops().with_overrides(platform.ops(), f"platform {platform.name!r}")
        torch.manual_seed(args.seed)
        if self.parallel.world_size == 1:
            model = model_cls(rank_config, ops, attention, config.dtype, platform.device)
        else:
            model = model_cls(
                rank_config,
                ops,
                attention,
                config.dtype,
                platform.device,
                parallel=ModelParallel(
                    layout, Communicator(self.groups, self._choose_all_reduce(config.dtype))
                ),
            )
        # as the builder: the matrices that run as stored (kvrun.quantization)
        keep = plan_quantized_load(config.quantization, checkpoint, model, platform)
        canonical = getattr(model_cls, "canonical_name", None)

        def narrow(name: str, shape: tuple[int, ...]) -> ReadPlan | None:
            """This rank's rows or columns of a tensor (safetensors reads only those)."""
            return weight_plan(canonical(name) if canonical else name, shape, layout, model_config)

        weights = checkpoint.iter_weights(
            config.dtype,
            awq_dequantize=ops.awq_dequantize,
            awq_device=platform.device,
            keep_quantized=keep,
            # a pipeline stage reads only its own layers' tensors
            select=(
                None
                if self.parallel.world_size == 1
                else lambda name: layout.wants(name, model_config.tie_word_embeddings)
            ),
            # and of each tensor only this rank's share
            narrow=narrow if self.parallel.tensor_parallel_size > 1 else None,
        )
        if self.parallel.world_size > 1:
            if canonical is not None:  # a media model's decoder names, which sharding reads
                weights = ((canonical(name), tensor) for name, tensor in weights)
            weights = shard_weights(weights, layout, model_config, narrowed=True)
        model.load_weights(weights, config.model_source)
        if not args.enforce_eager:
            self._compile(model)
        self.config, self.layout, self.model = config, layout, model
        self._rank_config, self._attention = rank_config, attention
        if config.enable_lora:
            self.lora = self._lora_slots(model_cls, model_config, ops, attention)
        logger.info(
            "rank %d (pp %d/%d, tp %d/%d): layers %d-%d, q heads %d-%d, kv heads %d-%d",
            self.spec.rank, self.pp_rank, self.parallel.pipeline_parallel_size, self.tp_rank,
            self.parallel.tensor_parallel_size, layout.layers[0], layout.layers[1] - 1,
            layout.q_heads[0], layout.q_heads[1] - 1, layout.kv_heads[0], layout.kv_heads[1] - 1,
        )  # fmt: skip

    def _compile(self, model: Any) -> None:
        compile_hook = getattr(model, "compile", None)
        if compile_hook is None:
            return
        if self.parallel.tensor_parallel_size > 1:
            logger.info(
                "rank %d: enforce_eager=False: the dense blocks run eagerly with "
                "tensor_parallel_size>1 (their all-reduce is not compiled)",
                self.spec.rank,
            )
            return
        settings = compile_settings(self.env)
        compile_hook(lambda fn, name: compile_function(fn, settings, name))

    def kv_cache_blocks(self) -> int:
        """KV blocks this rank's share of the budget holds: its own layers and KV heads
        against the platform's budget for this process (or num_kv_blocks when given)."""
        assert self.config is not None and self._rank_config is not None, "load_model first"
        assert self._attention is not None
        fixed = self.args.num_kv_blocks
        profile = None
        if fixed is None:
            last = self.layout is not None and self.layout.last_stage
            profile = self.model if last else _StageProfile(self.model)
        self._kv_request = kv_cache_request(
            self.platform, self.config, self._rank_config, self._attention, profile
        )
        if fixed is not None:
            return fixed
        return self.platform.plan_kv_cache(self._kv_request).num_blocks

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate exactly ``num_blocks`` blocks (the smallest count over the ranks)."""
        assert self.config is not None and self._rank_config is not None, "load_model first"
        if self._kv_request is None:
            self.kv_cache_blocks()
        assert self._kv_request is not None
        plan = plan_exact_kv_blocks(
            self._kv_request,
            num_blocks,
            "the KV cache every rank allocates (the fewest blocks any rank holds)",
        )
        self.kv_caches = self.platform.allocate_kv_cache(plan, self._rank_config.num_layers)
        self.config = replace(
            self.config, num_kv_blocks=num_blocks, kv_cache_bytes=plan.total_bytes
        )
        fused = None
        if self.parallel.world_size == 1:
            fused = self.platform.fused_decoder(self.model, self.kv_caches, self.config)
        else:
            logger.info(
                "rank %d: decode steps run op by op: the platform's fused decoder and decode "
                "graphs are single-process (tensor/pipeline parallelism)",
                self.spec.rank,
            )
        self.runner = ModelRunner(
            self.model,
            self.kv_caches,
            self.config.block_size,
            self.platform.device,
            fused_decoder=fused,
            lora=self.lora,
            mm_cache_size=self.env.VLLM_MM_INPUT_CACHE_SIZE,
        )

    def _lora_slots(
        self, model_cls: Any, model_config: ModelConfig, ops: Any, attention: AttentionBackend
    ) -> LoraManager:
        """This rank's adapter slots, shaped as its shard; an adapter is read against
        the whole model (its checks as the engine's) and then cut to this rank's share."""
        from kvrun.lora.adapter import load_adapter
        from kvrun.lora.manager import LoraManager
        from kvrun.lora.sharding import shard_adapter
        from kvrun.lora.slots import model_lora_targets

        config, layout = self.config, self.layout
        assert config is not None and layout is not None
        whole = model_lora_targets(model_cls, model_config, ops, attention, config.dtype)

        def read(request: Any) -> Any:
            adapter = load_adapter(request, whole, config.max_lora_rank)
            return shard_adapter(adapter, layout, model_config)

        return LoraManager(
            self.model.lora_targets(),
            max_loras=config.max_loras,
            max_lora_rank=config.max_lora_rank,
            max_cpu_loras=config.max_cpu_loras,
            dtype=config.dtype,
            device=self.platform.device,
            add_lora=ops.add_lora,
            read=read,
            follows_engine=True,
        )

    def commit_kv_cache(self) -> int:
        """Write this rank's whole KV cache once (so its pages are really allocated);
        the bytes written."""
        assert self.runner is not None, "init_kv_cache first"
        return self.runner.commit_kv_cache()

    # steps ---------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(
        self,
        chunks: Sequence[ScheduledChunk],
        prompt_logits_for: frozenset[str] = frozenset(),
        hidden_for: frozenset[str] = frozenset(),
    ) -> StepLogits | None:
        """Run this rank's part of one step. The driver rank returns the StepLogits
        exactly as :class:`~kvrun.engine.model_runner.ModelRunner` does; the others None."""
        assert self.runner is not None and self.layout is not None, "init_kv_cache first"
        if self.layout.last_stage:
            out = self.runner.execute(chunks, prompt_logits_for, hidden_for)
            return out if self.is_driver else None
        # an earlier stage: its layers, then the residual stream goes on (in forward)
        batch = build_batch(chunks, self.runner.block_size, self.runner.device)
        lora = self.runner.lora_batch(chunks, batch) if self.runner.lora is not None else None
        # a media model's M-RoPE positions on every stage; its media rows on stage 0 only
        positions, embeds = self.runner.media_inputs(chunks, batch)
        extra: dict[str, Any] = {}
        if lora is not None:
            extra["lora"] = lora
        if embeds is not None:
            extra["inputs_embeds"] = embeds
        self.model.forward(batch.input_ids, positions, self.kv_caches, batch.meta, **extra)
        return None

    def execute_step(self, message: ExecuteStep) -> StepLogits | None:
        """Run an executor's step message: its adapter loads and removals first (in the
        slots the engine chose), then :meth:`execute` on its chunks."""
        from kvrun.executor.messages import chunk_from_wire, lora_request

        chunks = [chunk_from_wire(c) for c in message.chunks]
        if message.lora is not None:
            if self.lora is None:
                raise ConfigError("a step names LoRA adapters, but this rank has no LoRA slots")
            for lora_id in message.lora.forget:
                self.lora.forget(lora_id)
            for load in message.lora.loads:
                self.lora.place(load.slot, lora_request(load))
            slots = self.lora.activate([c.lora_id for c in chunks])
            if slots != message.lora.slots:
                raise RuntimeError(
                    f"rank {self.spec.rank}: the step's adapter slots {message.lora.slots} "
                    f"differ from this rank's {slots}"
                )
        return self.execute(chunks, message.prompt_logits_for, message.hidden_for)

    def _choose_all_reduce(self, dtype: torch.dtype) -> CustomAllReduce | None:
        """The platform's faster all-reduce for this tensor-parallel group, unless
        disable_custom_all_reduce; every rank of the group calls this (it may agree by
        collectives). tp_rank 0 logs the choice."""
        assert self.groups is not None
        if self.parallel.tensor_parallel_size == 1:  # (the builder says the flag does nothing)
            return None
        if self.args.disable_custom_all_reduce:
            custom, why = None, "disable_custom_all_reduce"
        else:
            custom, why = self.platform.custom_all_reduce(self.groups, dtype)
        if self.tp_rank == 0:
            used = "the platform's custom all-reduce" if custom else f"{self.platform.dist_backend}"
            logger.info("pp stage %d: tensor-parallel all-reduce: %s (%s)", self.pp_rank, used, why)
        self._custom_all_reduce = custom
        return custom

    def close(self) -> None:
        """Release the custom all-reduce's buffers and leave the process groups
        (idempotent)."""
        if self._custom_all_reduce is not None:
            self._custom_all_reduce.close()
            self._custom_all_reduce = None
        close_quietly(self.groups)
        self.groups = None


def _has_executor(platform: Any) -> bool:
    """Whether the platform overrides model_executor (openvino, tpu: whole-model executors)."""
    from kvrun.platforms import Platform

    return type(platform).model_executor is not Platform.model_executor
