"""KV-cache invariants of a whole-model executor: the plan the engine really uses.

A platform whose ``model_executor(config)`` returns an executor never has its
``plan_kv_cache``/``allocate_kv_cache`` called by the engine: the executor's
``init_kv_cache`` plans and allocates instead, and the block manager hands out exactly
the ``num_blocks`` it reports. These checks hold that plan to the
:class:`~kvrun.platforms.ModelExecutor` invariants. Every check builds its own
executor, because ``init_kv_cache`` runs once per executor. Nothing here imports pytest.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvrun.config import EngineConfig
from kvrun.engine.executor_runner import execute_with_executor
from kvrun.errors import ConfigError
from kvrun.loader import load_checkpoint
from kvrun.models.config import ModelConfig
from kvrun.platforms import KVCachePlan, ModelExecutor, Platform
from kvrun.scheduling.capacity import blocks_needed
from kvrun.scheduling.output import ScheduledChunk
from kvrun.testing.op_checks import assert_close
from kvrun.testing.parity import engine_config_for
from kvrun.testing.target import dtype_name

__all__ = [
    "STORAGE_PROMPT_BLOCKS",
    "ExecutorCase",
    "check_executor_explicit_blocks",
    "check_executor_plan",
    "check_executor_refuses_small_budget",
    "check_top_blocks_hold_storage",
    "make_case",
    "observed_kv_bytes",
]

# Blocks the storage check's prompt fills (the last one partly), at the top and bottom ids.
STORAGE_PROMPT_BLOCKS = 3
# Blocks beyond one max_model_len sequence that the explicit-size check asks for: odd,
# so a plan that falls back to some default size is not equal by chance.
EXTRA_BLOCKS = 3


@dataclass(frozen=True)
class ExecutorCase:
    """What the checks build executors from: the platform and the engine's config."""

    platform: Platform
    config: EngineConfig  # as check_config returned it, the way the engine calls the executor
    num_layers: int  # the model's layers, which the plan must cover
    # The executor make_case built to learn there is one, handed out first (building one
    # can mean compiling a graph).
    spare: list[ModelExecutor] = field(default_factory=list)

    def what(self) -> str:
        return f"{self.platform.name} executor ({dtype_name(self.config.dtype)})"

    def new_executor(self) -> ModelExecutor:
        """A fresh executor, whose init_kv_cache has not run."""
        executor = self.spare.pop() if self.spare else self.platform.model_executor(self.config)
        assert executor is not None, f"{self.what()}: model_executor() returned None"
        assert executor.block_size == self.config.block_size, (
            f"{self.what()}: block_size {executor.block_size}, but the config "
            f"(after check_config) says {self.config.block_size}; a graph that needs another "
            "block size must set it in check_config"
        )
        return executor

    @property
    def min_blocks(self) -> int:
        return blocks_needed(self.config.max_model_len, self.config.block_size)


def make_case(platform: Platform, model_dir: Path, dtype: torch.dtype) -> ExecutorCase | None:
    """The engine's config for the kit's model, as check_config adjusts it, when
    ``model_executor`` gives an executor for it; None when the core model runs instead."""
    config, _ = platform.check_config(engine_config_for(model_dir, platform, dtype))
    executor = platform.model_executor(config)
    if executor is None:
        return None
    checkpoint = load_checkpoint(
        str(model_dir), revision=None, hf_hub_offline=True, use_modelscope=False, download_dir=None
    )
    layers = ModelConfig.from_hf(checkpoint.hf_config, checkpoint.source).num_layers
    return ExecutorCase(platform, config, layers, [executor])


def _check_plan_shape(case: ExecutorCase, plan: KVCachePlan, what: str) -> None:
    assert plan.block_size == case.config.block_size, (
        f"{what}: the plan's block_size is {plan.block_size}, the config's {case.config.block_size}"
    )
    assert plan.num_layers == case.num_layers, (
        f"{what}: the plan covers {plan.num_layers} layers, the model has {case.num_layers}"
    )
    assert plan.num_blocks >= case.min_blocks, (
        f"{what}: {plan.num_blocks} blocks cannot hold one sequence of max_model_len="
        f"{case.config.max_model_len} ({case.min_blocks} blocks); it should have refused"
    )
    assert plan.total_bytes <= plan.budget_bytes, (
        f"{what}: plans {plan.total_bytes} bytes, over its budget of {plan.budget_bytes} "
        f"({plan.reason})"
    )
    assert plan.reason.strip(), f"{what}: the plan gives no reason (the start-up log prints it)"


def _check_observed_bytes(plan: KVCachePlan, observed: int | None, what: str) -> None:
    if observed is None:  # the cache is not reachable from the executor's own objects
        return
    assert observed == plan.total_bytes, (
        f"{what}: the plan reports {plan.total_bytes} bytes of KV cache, but the executor "
        f"allocated {observed} bytes of cache tensors ({plan.num_blocks} blocks)"
    )


def check_executor_plan(case: ExecutorCase) -> KVCachePlan:
    """init_kv_cache(None, ...) carves a plan from the platform's budget that keeps to it."""
    executor = case.new_executor()
    before = _storage_ids(executor)
    plan = executor.init_kv_cache(None, case.config.max_model_len)
    what = f"{case.what()} init_kv_cache(None)"
    _check_plan_shape(case, plan, what)
    _check_observed_bytes(plan, observed_kv_bytes(executor, before), what)
    check_top_blocks_hold_storage(executor, plan, case)
    return plan


def check_executor_refuses_small_budget(case: ExecutorCase) -> None:
    """A budget that cannot hold one max_model_len sequence is a ConfigError, not a plan.

    The length that cannot fit is one block more than a first executor's budget plan
    holds; a second executor, carving from the same budget, must refuse it.
    """
    full = case.new_executor().init_kv_cache(None, case.config.max_model_len)
    too_long = (full.num_blocks + 1) * case.config.block_size
    _expect_refusal(case, None, too_long, f"{full.num_blocks} blocks ({full.reason})")


def check_executor_explicit_blocks(case: ExecutorCase) -> KVCachePlan:
    """num_kv_blocks=N gives exactly N blocks, all backed; too few for one sequence refuse."""
    short = case.min_blocks - 1
    _expect_refusal(case, short, case.config.max_model_len, f"num_kv_blocks={short}")
    blocks = case.min_blocks + EXTRA_BLOCKS
    executor = case.new_executor()
    before = _storage_ids(executor)
    plan = executor.init_kv_cache(blocks, case.config.max_model_len)
    what = f"{case.what()} init_kv_cache({blocks})"
    assert plan.num_blocks == blocks, (
        f"{what}: the plan has {plan.num_blocks} blocks; num_kv_blocks={blocks} was asked "
        "for, and the block manager hands out exactly the plan's blocks"
    )
    _check_plan_shape(case, plan, what)
    _check_observed_bytes(plan, observed_kv_bytes(executor, before), what)
    check_top_blocks_hold_storage(executor, plan, case)
    return plan


def _expect_refusal(case: ExecutorCase, blocks: int | None, max_model_len: int, has: str) -> None:
    try:
        plan = case.new_executor().init_kv_cache(blocks, max_model_len)
    except ConfigError as exc:
        assert str(exc).strip(), f"{case.what()}: the ConfigError has no message"
        return
    raise AssertionError(
        f"{case.what()} init_kv_cache({blocks}, max_model_len={max_model_len}): planned "
        f"{plan.num_blocks} blocks from {has}, but one sequence needs "
        f"{blocks_needed(max_model_len, case.config.block_size)}; it must raise "
        "kvrun.errors.ConfigError"
    )


def check_top_blocks_hold_storage(
    executor: ModelExecutor, plan: KVCachePlan, case: ExecutorCase, seed: int = 0
) -> None:
    """The highest block ids the plan reports hold K/V as well as the lowest do.

    One prompt runs twice through the executor, in chunks the config's token budget
    allows and then one decode step: once in blocks 0, 1, 2 and once in the plan's top
    three ids. An executor that allocated fewer blocks than it reported loses (or
    crashes on) the top ones, and its logits differ.
    """
    bs, top = case.config.block_size, plan.num_blocks
    assert top >= 2 * STORAGE_PROMPT_BLOCKS, f"{case.what()}: only {top} blocks to test"
    g = torch.Generator().manual_seed(seed)
    length = (STORAGE_PROMPT_BLOCKS - 1) * bs + 3
    prompt = [int(t) for t in torch.randint(3, case.config.vocab_size, (length,), generator=g)]
    low = list(range(STORAGE_PROMPT_BLOCKS))
    high = [top - 1 - i for i in range(STORAGE_PROMPT_BLOCKS)]
    got_low = _run_prompt(executor, case, "storage-low", prompt, low)
    got_high = _run_prompt(executor, case, "storage-high", prompt, high)
    for step, (want, got) in enumerate(zip(got_low, got_high, strict=True)):
        assert_close(
            got,
            want,
            case.config.dtype,
            f"{case.what()}: logits in blocks {high} (the plan's highest of {top}) against "
            f"blocks {low}, step {step}; every reported block must be backed by storage",
        )


@torch.inference_mode()
def _run_prompt(
    executor: ModelExecutor,
    case: ExecutorCase,
    request_id: str,
    prompt: list[int],
    blocks: list[int],
) -> list[torch.Tensor]:
    """Logits [V] of each chunk's last token, then of one decode step."""
    step = case.config.max_num_batched_tokens
    chunks = [
        ScheduledChunk(request_id, prompt[i : i + step], i, blocks, True, True)
        for i in range(0, len(prompt), step)
    ]
    chunks.append(ScheduledChunk(request_id, [prompt[-1]], len(prompt), blocks, True, False))
    out = []
    for chunk in chunks:
        logits = execute_with_executor(
            executor, [chunk], frozenset(), case.config.block_size, case.platform.device
        )
        out.append(logits.logits[0].float().cpu())
    return out


# Finding the cache tensors ------------------------------------------------------------
def _storage_bytes(obj: Any) -> int | None:
    """Bytes of a torch tensor or of a runtime tensor with a byte_size; None otherwise."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    try:  # a runtime object's properties may raise for reasons of their own
        size = getattr(obj, "byte_size", None)
        return size if isinstance(size, int) and hasattr(obj, "shape") else None  # openvino
    except Exception:
        return None


def _reachable(root: Any, depth: int = 4) -> Iterator[Any]:
    """Objects reachable from ``root`` through attributes of the vendor's own classes
    (same top-level package as the executor) and through lists, tuples and dicts.

    Other packages' objects (the core model's weights, a runtime's compiled graph) are
    yielded but not entered, so only what the vendor's code holds is counted.
    """
    package = type(root).__module__.split(".")[0]
    seen: set[int] = set()
    stack = [(root, 0)]
    while stack:
        obj, level = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        if level >= depth:
            continue
        if isinstance(obj, list | tuple):
            children = list(obj)
        elif isinstance(obj, dict):
            children = list(obj.values())
        elif type(obj).__module__.split(".")[0] == package and hasattr(obj, "__dict__"):
            children = list(vars(obj).values())
        else:
            continue
        stack.extend((child, level + 1) for child in children)


def _storage_ids(executor: ModelExecutor) -> dict[int, Any]:
    # The objects are kept (as values) so that no id is reused while the check runs.
    return {id(o): o for o in _reachable(executor) if _storage_bytes(o) is not None}


def observed_kv_bytes(executor: ModelExecutor, before: Mapping[int, Any]) -> int | None:
    """Bytes of the tensors init_kv_cache added to the executor's own objects (its
    cache); None when none are reachable (a cache kept inside a compiled runtime)."""
    found = [
        size
        for obj in _reachable(executor)
        if id(obj) not in before and (size := _storage_bytes(obj)) is not None
    ]
    return sum(found) if found else None
