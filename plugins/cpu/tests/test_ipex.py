"""The IPEX attention backend (intel-extension-for-pytorch), offered by the cpu platform.

Without IPEX (the default test run) this checks that the platform does not offer it,
that asking for it says how to install it, and the layout checks that guard every IPEX
call. With IPEX (``nox -s ipex``: its own virtualenv, IPEX pins torch 2.8) it also runs
IPEX against the core's ReferenceAttention through the conformance kit's scenarios and
the real engine's greedy output against the reference model.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from kvrun.attention.base import AttentionLayerSpec, AttentionMetadata
from kvrun.envs import EnvSnapshot, read_env
from kvrun.errors import ConfigError
from kvrun.testing import attention_checks, parity
from kvrun_cpu.attention import IpexAttention
from kvrun_cpu.attention.ipex import IpexLayoutError, check_step, ipex_status
from kvrun_cpu.platform import CpuPlatform

IPEX_OK, IPEX_WHY = ipex_status()
needs_ipex = pytest.mark.skipif(
    not IPEX_OK, reason="intel_extension_for_pytorch is not installed; run `nox -s ipex`"
)
SPEC = AttentionLayerSpec(num_heads=4, num_kv_heads=2, head_dim=16, scale=0.25)
BS = 16  # tokens per block
NB = 4  # blocks in the small caches below


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny shapes: a second OpenMP thread only waits (as the conformance kit does)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_env(tmp: Path) -> EnvSnapshot:
    return read_env(
        {
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_PLUGINS": "cpu",
            "VLLM_CACHE_ROOT": str(tmp),
            "VLLM_CPU_KVCACHE_SPACE": "1",
        }
    )


# Without IPEX ---------------------------------------------------------------------------
def test_importing_the_plugin_does_not_import_ipex() -> None:
    code = (
        "import sys, kvrun_cpu, kvrun_cpu.platform, kvrun_cpu.attention.ipex; "
        "print('intel_extension_for_pytorch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "False\n"


def test_kv_cache_shape_is_block_major_with_keys_and_values_apart() -> None:
    assert IpexAttention.kv_cache_shape(5, 16, 2, 8) == (2, 5, 2, 16, 8)


@pytest.mark.skipif(IPEX_OK, reason="intel_extension_for_pytorch is installed here")
def test_without_ipex_it_is_not_offered_and_asking_says_how_to_install(tmp_path: Path) -> None:
    cpu = CpuPlatform(make_env(tmp_path))
    assert sorted(cpu.attention_backends()) == ["REFERENCE", "TORCH_SDPA"]
    assert cpu.ipex_status() == (False, "intel_extension_for_pytorch is not installed")
    with pytest.raises(ConfigError) as err:
        cpu.attention_backend("IPEX", SPEC)
    assert str(err.value) == (
        "VLLM_ATTENTION_BACKEND='IPEX' needs intel-extension-for-pytorch, which the cpu "
        "platform cannot use here: intel_extension_for_pytorch is not installed. Install it "
        'with pip install "torch==2.8.0" "intel-extension-for-pytorch==2.8.0" (IPEX pins its '
        "torch: 2.8.x runs only on torch 2.8, so keep it in its own virtualenv, as `nox -s "
        "ipex` does); or choose TORCH_SDPA or REFERENCE"
    )
    with pytest.raises(ConfigError) as direct:
        IpexAttention(SPEC)
    assert str(direct.value) == str(err.value)


# Layout checks (pure: they run everywhere) ----------------------------------------------
Step = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]


def one_decode(
    cache: torch.Tensor | None = None,
    tables: torch.Tensor | None = None,
    slot: int = BS,
    q_dtype: torch.dtype = torch.float32,
    **meta_fields: Any,
) -> Step:
    """One request decoding its first token into block 1 of a NaN cache."""
    if cache is None:
        cache = torch.full(IpexAttention.kv_cache_shape(NB, BS, 2, 16), float("nan"))
    meta = AttentionMetadata(
        num_tokens=1,
        slot_mapping=torch.tensor([slot]),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        seq_lens=torch.tensor([1], dtype=torch.int32),
        block_tables=torch.tensor([[1]], dtype=torch.int32) if tables is None else tables,
        query_lens=[1],
        seq_lens_host=[1],
        block_size=BS,
        max_query_len=1,
        max_seq_len=1,
    )
    q = torch.randn(1, 4, 16, dtype=q_dtype)
    return q, torch.randn(1, 2, 16), torch.randn(1, 2, 16), cache, replace(meta, **meta_fields)


NEED = "the IPEX kernels need"
BAD_STEPS: dict[str, tuple[Callable[[], Step], str]] = {
    "token-major-cache": (
        # The reference backend's layout [2, NB, bs, Hk, D].
        lambda: one_decode(cache=torch.full((2, NB, BS, 2, 16), float("nan"))),
        "IPEX attention: the KV cache is shape (2, 4, 16, 2, 16), dtype float32, stride "
        f"(2048, 512, 32, 16, 1); {NEED} [2, num_blocks, num_kv_heads, block_size, head_dim] "
        "= [2, *, 2, 16, 16] (IpexAttention.kv_cache_shape)",
    ),
    "strided-cache": (
        # TORCH_SDPA's head-major cache viewed in IPEX's order: right shape, wrong strides.
        lambda: one_decode(cache=torch.full((2, 2, NB, BS, 16), float("nan")).transpose(1, 2)),
        "IPEX attention: the KV cache is shape (2, 4, 2, 16, 16), dtype float32, stride "
        f"(2048, 256, 1024, 16, 1); {NEED} a contiguous [2, num_blocks, num_kv_heads, "
        "block_size, head_dim] tensor",
    ),
    "int8-cache": (
        lambda: one_decode(cache=torch.zeros((2, NB, 2, BS, 16), dtype=torch.int8)),
        "IPEX attention: the KV cache is shape (2, 4, 2, 16, 16), dtype int8, stride "
        f"(2048, 512, 256, 16, 1); {NEED} one of the dtypes float32, bfloat16, float16",
    ),
    "query-dtype": (
        lambda: one_decode(q_dtype=torch.bfloat16),
        "IPEX attention: query is shape (1, 4, 16), dtype bfloat16, stride (64, 16, 1) on cpu; "
        f"{NEED} a contiguous (1, 4, 16) tensor in the cache's dtype float32",
    ),
    "slot-out-of-cache": (
        lambda: one_decode(slot=NB * BS),
        "IPEX attention: slot_mapping holds values from 64 to 64; a cache slot must lie in [0, 64)",
    ),
    "block-id-out-of-cache": (
        lambda: one_decode(tables=torch.tensor([[NB]], dtype=torch.int32)),
        "IPEX attention: block_tables holds values from 4 to 4; a block id must lie in [0, 4)",
    ),
    "int64-block-tables": (
        lambda: one_decode(tables=torch.tensor([[1]])),
        "IPEX attention: block_tables is shape (1, 1), dtype int64, stride (1, 1); "
        f"{NEED} a contiguous 2-D int32 tensor with 1 rows",
    ),
    "seq-lens-disagree": (
        lambda: one_decode(seq_lens=torch.tensor([9], dtype=torch.int32)),
        "IPEX attention: query_start_loc [0, 1] and seq_lens [9] disagree with the host "
        "lengths (query starts [0, 1], context lengths [1])",
    ),
    "context-beyond-table": (
        lambda: one_decode(
            seq_lens=torch.tensor([17], dtype=torch.int32), seq_lens_host=[17], max_seq_len=17
        ),
        "IPEX attention: a context of 17 tokens does not fit block tables of 1 blocks of 16 tokens",
    ),
    "short-max-seq-len": (
        lambda: one_decode(max_seq_len=0),
        "IPEX attention: max_query_len 1 and max_seq_len 0 for query lengths [1] and context "
        "lengths [1]; they must be the longest of each (the kernels size their buffers by them)",
    ),
    "strided-block-tables": (
        lambda: one_decode(tables=torch.tensor([[1, 9], [0, 9]], dtype=torch.int32)[:, :1].t()),
        "IPEX attention: block_tables is shape (1, 2), dtype int32, stride (1, 2); "
        f"{NEED} a contiguous 2-D int32 tensor with 1 rows",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_STEPS))
def test_check_step_names_the_tensor_and_the_layout_ipex_needs(case: str) -> None:
    build, message = BAD_STEPS[case]
    with pytest.raises(IpexLayoutError) as err:
        check_step(SPEC, *build())
    assert str(err.value) == message


def test_check_step_accepts_the_layout_ipex_needs() -> None:
    check_step(SPEC, *one_decode())


# With IPEX ------------------------------------------------------------------------------
@needs_ipex
@pytest.mark.parametrize("case", sorted(BAD_STEPS))
def test_a_bad_layout_is_refused_before_ipex_touches_the_cache(case: str) -> None:
    build, message = BAD_STEPS[case]
    q, k, v, cache, meta = build()
    before = cache.clone()
    with pytest.raises(IpexLayoutError) as err:
        IpexAttention(SPEC).forward(q, k, v, cache, meta)
    assert str(err.value) == message
    # reshape_and_cache is the first IPEX call; the cache is bit for bit as it was.
    assert torch.equal(cache.view(torch.uint8), before.view(torch.uint8))


@needs_ipex
def test_the_platform_offers_ipex(tmp_path: Path) -> None:
    cpu = CpuPlatform(make_env(tmp_path))
    assert cpu.ipex_status() == (True, IPEX_WHY)
    assert IPEX_WHY.startswith("intel_extension_for_pytorch 2.")
    assert cpu.attention_backends()["IPEX"] is IpexAttention
    assert type(cpu.attention_backend("IPEX", SPEC)) is IpexAttention


@needs_ipex
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "scenario", attention_checks.SCENARIOS, ids=[s.name for s in attention_checks.SCENARIOS]
)
@pytest.mark.parametrize(
    "spec",
    [s for _, s in attention_checks.LAYER_SPECS],
    ids=[label for label, _ in attention_checks.LAYER_SPECS],
)
def test_ipex_matches_the_reference_attention(
    spec: AttentionLayerSpec, scenario: attention_checks.Scenario, dtype: torch.dtype
) -> None:
    # Prefill, decode, chunked prefill beside decodes, prefix hits; MHA, GQA and MQA.
    attention_checks.check_backend(IpexAttention(spec), scenario, dtype, torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return parity.cached_tiny_llama(tmp_path_factory.mktemp("models"))


@needs_ipex
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_engine_greedy_with_ipex_equals_the_reference(
    tiny_llama: Path, dtype: torch.dtype, tmp_path: Path
) -> None:
    prompts = parity.kit_prompts()
    want, logits = parity.reference_greedy(tiny_llama, prompts, dtype, torch.device("cpu"))
    got = parity.engine_greedy(tiny_llama, make_env(tmp_path), dtype, "IPEX", prompts)
    assert parity.compare_greedy(got, want, logits, dtype) == []
    if dtype == torch.float32:  # no fp32 near-ties on this model: exactly the same tokens
        assert got == want
    # In bf16 the two orders of summation may pick either side of a near-tie (a reference
    # logit gap under 0.25), after which the continuations differ; compare_greedy allows it.
