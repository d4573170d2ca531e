"""End-to-end greedy parity: the platform through the real engine against the reference.

The reference is the core's own model with the reference ops and
:class:`~kvrun.attention.reference.ReferenceAttention`, recomputing the whole
sequence for every token (no cache reuse, no batching), on the platform's device.
The platform runs the same checkpoint through :class:`~kvrun.engine.llm_engine.LLMEngine`
with prefix caching and small chunked-prefill steps, so batching, chunking and prefix
hits all have to come out equal. A platform the engine cannot select (built from a
class path while its probe says no) is handed to the engine directly. Nothing here
imports pytest.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kvrun.attention.base import AttentionLayerSpec, AttentionMetadata
from kvrun.attention.reference import ReferenceAttention
from kvrun.config import EngineArgs, EngineConfig
from kvrun.engine.llm_engine import LLMEngine
from kvrun.engine.output_accumulator import OutputAccumulator
from kvrun.envs import EnvSnapshot
from kvrun.loader import load_checkpoint
from kvrun.models.config import ModelConfig
from kvrun.models.registry import ModelRegistry
from kvrun.ops import reference_ops
from kvrun.outputs import RequestOutput
from kvrun.platforms import Platform
from kvrun.sampling_params import SamplingParams
from kvrun.testing.checkpoints import build_random_checkpoint, build_word_tokenizer
from kvrun.testing.target import dtype_name

__all__ = [
    "BLOCK_SIZE",
    "MAX_NEW_TOKENS",
    "TINY_VOCAB",
    "Mismatch",
    "build_tiny_llama",
    "cached_tiny_llama",
    "compare_greedy",
    "engine_config_for",
    "engine_greedy",
    "kit_prompts",
    "reference_greedy",
]

TINY_VOCAB = 256
BLOCK_SIZE = 16
MAX_NEW_TOKENS = 8
# Below the per-step token budget, which the scheduler requires.
MAX_NUM_SEQS = 4
# Logit gaps below this count as ties: two correct implementations may pick either token.
TIE_MARGIN = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.05}


def build_tiny_llama(out_dir: str | Path, seed: int = 0) -> Path:
    """A 2-layer grouped-query Llama (4 query heads, 2 kv heads, head_dim 16, vocab 256).

    Its weights are larger than a trained model's (std 0.1) so that greedy choices are
    decided by clear logit gaps, not by rounding.
    """
    out = Path(out_dir)
    build_word_tokenizer(out / "tokenizer", TINY_VOCAB)
    return build_random_checkpoint(
        "llama",
        out / "model",
        seed=seed,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=TINY_VOCAB,
        max_position_embeddings=256,
        init_std=0.1,
        tokenizer_dir=out / "tokenizer",
    )


# Bump when build_tiny_llama's output changes, so cached copies are rebuilt.
_MODEL_VERSION = 1


def cached_tiny_llama(cache_root: str | Path) -> Path:
    """build_tiny_llama's checkpoint, built once under ``cache_root`` and reused.

    Keyed by the kit's model version and the transformers version that wrote it. The
    build goes to a private sibling renamed into place, so concurrent runs never see
    half a checkpoint (a run that loses the rename uses the winner's equal copy).
    """
    import transformers

    final = Path(cache_root) / f"tiny-llama-v{_MODEL_VERSION}-tf{transformers.__version__}"
    if (final / "model" / "config.json").is_file():
        return final / "model"
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build_tiny_llama(scratch)
        try:
            scratch.rename(final)
        except OSError:
            if not (final / "model" / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final / "model"


def kit_prompts(seed: int = 0) -> list[list[int]]:
    """Prompts in an order that exercises the scheduler: see engine_greedy.

    0 and 1 share their first two blocks (a prefix hit for 1), 2 is longer than one
    prefill step (chunked), 3 is shorter than one block.
    """
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return [int(t) for t in torch.randint(3, TINY_VOCAB, (n,), generator=g)]

    shared = ids(2 * BLOCK_SIZE)
    return [shared + ids(5), shared + ids(11), ids(45), ids(3)]


def engine_config_for(model_dir: Path, platform: Platform, dtype: torch.dtype) -> EngineConfig:
    """The EngineConfig the engine resolves for the tiny model (for model_executor())."""
    checkpoint = load_checkpoint(
        str(model_dir), revision=None, hf_hub_offline=True, use_modelscope=False, download_dir=None
    )
    model = ModelConfig.from_hf(checkpoint.hf_config, checkpoint.source)
    return EngineConfig(
        model_source=checkpoint.source,
        model_name=checkpoint.source,
        architecture=model.architecture,
        dtype=dtype,
        max_model_len=model.max_position_embeddings,
        vocab_size=model.vocab_size,
        block_size=BLOCK_SIZE,
        max_num_seqs=MAX_NUM_SEQS,
        max_num_batched_tokens=BLOCK_SIZE,
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        seed=0,
        max_logprobs=20,
        platform_name=platform.name,
        attention_backend=platform.default_attention_backend,
    )


# no_grad, not inference_mode: torch_xla cannot version inference tensors.
@torch.no_grad()
def reference_greedy(
    model_dir: Path,
    prompts: Sequence[list[int]],
    dtype: torch.dtype,
    device: torch.device,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Greedy tokens of each prompt and the float32 logits [V] behind each choice."""
    checkpoint = load_checkpoint(
        str(model_dir), revision=None, hf_hub_offline=True, use_modelscope=False, download_dir=None
    )
    config = ModelConfig.from_hf(checkpoint.hf_config, checkpoint.source)
    spec = AttentionLayerSpec(
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        scale=config.head_dim**-0.5,
    )
    model_cls = ModelRegistry().resolve(config.architecture, checkpoint.source)
    model = model_cls(config, reference_ops(), ReferenceAttention(spec), dtype, device)
    model.load_weights(checkpoint.iter_weights(dtype), checkpoint.source)
    tokens: list[list[int]] = []
    logits: list[list[torch.Tensor]] = []
    for prompt in prompts:
        seq = list(prompt)
        chosen: list[int] = []
        rows: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            n = len(seq)
            blocks = -(-n // BLOCK_SIZE)
            shape = ReferenceAttention.kv_cache_shape(
                blocks, BLOCK_SIZE, config.num_kv_heads, config.head_dim
            )
            caches = [
                torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)
            ]
            meta = AttentionMetadata(
                num_tokens=n,
                slot_mapping=torch.arange(n, dtype=torch.int64, device=device),
                query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
                seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
                block_tables=torch.arange(blocks, dtype=torch.int32, device=device).unsqueeze(0),
                query_lens=[n],
                seq_lens_host=[n],
                block_size=BLOCK_SIZE,
                max_query_len=n,
                max_seq_len=n,
            )
            ids = torch.tensor(seq, dtype=torch.int64, device=device)
            hidden = model.forward(ids, ids.new_tensor(range(n)), caches, meta)
            row = model.compute_logits(hidden[-1:])[0].float().cpu()
            token = int(row.argmax())
            chosen.append(token)
            rows.append(row)
            seq.append(token)
        tokens.append(chosen)
        logits.append(rows)
    return tokens, logits


def engine_greedy(
    model_dir: Path,
    env: EnvSnapshot,
    dtype: torch.dtype,
    attention_backend: str | None,
    prompts: Sequence[list[int]],
    num_kv_blocks: int | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    platform: Platform | None = None,
) -> list[list[int]]:
    """Greedy tokens from the real engine on ``env``'s platform, or on ``platform``
    when given (one built from its class path, whose probe refuses this machine).

    Prompt 0 runs alone first so that prompt 1 hits its cached prefix; the rest run as
    one batch whose prefills are cut into BLOCK_SIZE-token chunks beside decodes.
    """
    engine = LLMEngine.from_args(
        EngineArgs(
            model=str(model_dir),
            dtype=dtype_name(dtype),
            block_size=BLOCK_SIZE,
            max_num_seqs=MAX_NUM_SEQS,
            max_num_batched_tokens=BLOCK_SIZE,
            enable_prefix_caching=True,
            enable_chunked_prefill=True,
            attention_backend=attention_backend,
            num_kv_blocks=num_kv_blocks,
        ),
        env,
        platform,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True)
    finished: dict[str, RequestOutput] = {}
    accumulator = OutputAccumulator()

    def drain() -> None:
        while engine.has_unfinished_requests():
            for delta in engine.step():
                out = accumulator.add(delta)
                if out is not None and out.finished:
                    finished[out.request_id] = out

    ids = [f"kit-{i}" for i in range(len(prompts))]
    for i, (request_id, prompt) in enumerate(zip(ids, prompts)):
        engine.add_request(request_id, list(prompt), params)
        if i == 0:
            drain()
    drain()
    return [list(finished[r].outputs[0].token_ids) for r in ids]


@dataclass(frozen=True)
class Mismatch:
    """The first greedy step where the platform chose another token than the reference."""

    prompt: int  # index into the prompts
    step: int  # generated-token index
    want: int  # the reference's token
    got: int  # the platform's token
    margin: float  # reference logit gap between the two tokens

    def describe(self) -> str:
        return (
            f"prompt {self.prompt}, generated token {self.step}: the platform chose {self.got}, "
            f"the reference {self.want} (reference logit gap {self.margin:.4g}, not a tie)"
        )


def compare_greedy(
    got: Sequence[list[int]],
    want: Sequence[list[int]],
    want_logits: Sequence[list[torch.Tensor]],
    dtype: torch.dtype,
) -> list[Mismatch]:
    """Every prompt whose tokens differ before a near-tie; after a tie both paths are right."""
    tie = TIE_MARGIN.get(dtype, 0.05)
    bad = []
    for p, (g, w) in enumerate(zip(got, want)):
        if len(g) != len(w):
            bad.append(Mismatch(p, min(len(g), len(w)), -1, -1, float("inf")))
            continue
        for step, (a, b) in enumerate(zip(g, w)):
            if a == b:
                continue
            row = want_logits[p][step]
            margin = float(row[b] - row[a])
            if margin > tie:
                bad.append(Mismatch(p, step, b, a, margin))
            break
    return bad
