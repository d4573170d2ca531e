"""The tpu platform's whole-model executor: how the engine drives the XLA runner.

The engine (``kvrun.engine.builder``) asks ``Platform.model_executor(config)`` for an
executor and, given one, hands it each step's flat batch instead of running the core
model itself. This executor loads the core's own model onto the XLA device and runs
it through :class:`kvrun_tpu.runner.XlaModelRunner`, so bucketing, the padding sink
and the warm-up all apply under ``LLM(...)`` and the server too.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from kvrun.attention.base import AttentionLayerSpec
from kvrun.errors import ConfigError
from kvrun.loader import S3Settings, load_checkpoint
from kvrun.models.config import ModelConfig
from kvrun.models.registry import ModelRegistry
from kvrun.ops import reference_ops
from kvrun.platforms import KVCachePlan, KVCacheRequest, ModelExecutor

if TYPE_CHECKING:
    from kvrun.config import EngineConfig
    from kvrun_tpu.platform import TpuPlatform
    from kvrun_tpu.runner import XlaModelRunner

__all__ = ["XlaModelExecutor"]


class XlaModelExecutor(ModelExecutor):
    """The core model on the XLA device; the KV cache and the compiled graphs are its own.

    ``init_kv_cache`` allocates the cache (plus the padding sink block) and warms up
    every bucket, so serving starts with all sampling graphs compiled.
    """

    def __init__(self, platform: TpuPlatform, config: EngineConfig) -> None:
        self.platform = platform
        self.config = config
        self.block_size = config.block_size
        env = platform.env
        checkpoint = load_checkpoint(
            config.model_source,
            hf_hub_offline=env.HF_HUB_OFFLINE,
            use_modelscope=env.VLLM_USE_MODELSCOPE,
            load_format=config.load_format,
            trust_remote_code=config.trust_remote_code,
            dummy_seed=config.seed,
            s3=S3Settings.from_env(env),
        )
        # Built-in architectures only: general plugins' models are not offered here yet.
        self.model_config = c = ModelConfig.from_hf(checkpoint.hf_config, checkpoint.source)
        if c.is_mla:
            # Its modes, scale and latent cache are resolved by the core's engine builder,
            # which this executor does not run: refused rather than run with plain heads.
            raise ConfigError(
                f"{c.architecture} (multi-head latent attention) is not supported on the "
                "tpu platform yet; run it on the cpu or cuda platform"
            )
        model_cls = ModelRegistry().resolve(c.architecture, checkpoint.source)
        spec = AttentionLayerSpec(
            num_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            scale=c.head_dim**-0.5,
        )
        self.attention = platform.attention_backend(config.attention_backend, spec)
        self.model: Any = model_cls(
            c, reference_ops(), self.attention, config.dtype, platform.device
        )
        self.model.load_weights(checkpoint.iter_weights(config.dtype), checkpoint.source)
        self.runner: XlaModelRunner | None = None

    def init_kv_cache(self, num_blocks: int | None, max_model_len: int) -> KVCachePlan:
        c, bs = self.model_config, self.block_size
        request = KVCacheRequest(
            num_layers=c.num_layers,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            block_size=bs,
            dtype=self.config.dtype,
            max_model_len=max_model_len,
            layer_shape=lambda n: self.attention.kv_cache_shape(n, bs, c.num_kv_heads, c.head_dim),
        )
        if num_blocks is None:
            plan = self.platform.plan_kv_cache(request)
        elif num_blocks < request.min_blocks:
            raise ConfigError(
                f"num_kv_blocks={num_blocks} cannot hold one sequence of max_model_len="
                f"{max_model_len} ({request.min_blocks} blocks of {bs} tokens); raise "
                "num_kv_blocks or lower max_model_len"
            )
        else:
            plan = KVCachePlan(
                num_blocks=num_blocks,
                block_size=bs,
                dtype=request.dtype,
                layer_shape=request.layer_shape(num_blocks),
                num_layers=c.num_layers,
                # the sink block is on top of what was asked for
                budget_bytes=(num_blocks + 1) * request.bytes_per_block,
                reason=f"num_kv_blocks={num_blocks} asked for, plus one padding block",
            )
        caches = self.platform.allocate_kv_cache(plan, c.num_layers)
        config = replace(self.config, num_kv_blocks=plan.num_blocks, max_model_len=max_model_len)
        self.runner = self.platform.make_runner(self.model, caches, config)
        self.runner.warm_up()
        return plan

    def execute(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: Any,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        assert self.runner is not None, "init_kv_cache must run before execute"
        rows = logits_indices.cpu().tolist()
        # The engine steps under inference_mode, whose tensors torch_xla cannot version
        # ("Cannot set version_counter for inference tensor"); the runner rebuilds every
        # input from host lists, so it runs outside it. Positions follow from the metadata.
        with torch.inference_mode(False):
            return self.runner.execute_flat(input_ids, meta, rows)
