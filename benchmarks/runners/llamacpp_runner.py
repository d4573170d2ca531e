"""Peer: llama.cpp through llama-cpp-python's C bindings, greedy, on a GGUF file.

llama-cpp-python's high-level `Llama` object drives one sequence at a time, so
for batched throughput this runner uses the bindings directly, the way
llama.cpp's own `batched`/`parallel` examples do: one context with n_seq_max
sequences, each in its own KV stream, every decode step one llama_batch holding
the next token of every live sequence. Options (spec "options"):

- "batched": true (default) decodes all prompts together; false runs them one
  after another, as a plain llama-cpp-python user would;
- "label": how run.py names this configuration (F32 vs Q4_1 GGUF).

Greedy is an argmax over each sequence's logits (first index on ties, as torch).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from typing import Any

from common import Engine, RunSpec, main

N_BATCH = 2048  # tokens per llama_decode call during prefill


def has_amx() -> bool:
    with open("/proc/cpuinfo") as f:
        flags = next((line.split() for line in f if line.startswith("flags")), [])
    return "amx_tile" in flags


def without_amx_repack(lc: Any, mparams: Any) -> str | None:
    """On a CPU with AMX, load the weights as plain CPU buffers; returns why, or None.

    llama.cpp picks its AMX "extra buffer type" (weights repacked for AMX tiles) where the
    CPU has AMX. In llama-cpp-python 0.3.36 built here (GGML_NATIVE=ON, Intel Xeon Sapphire
    Rapids) llama_decode then crashes (SIGSEGV) on any batch of more than one token;
    single tokens run, and fast (~147 tok/s single-stream on the Q4_1 default model
    against ~76 without the repack, measured once). Without extra buffer types every
    batch runs, on llama.cpp's AVX-512/VNNI kernels. Elsewhere (AMD, no AMX) the extra
    buffers (its CPU repacking) are kept.
    """
    if not has_amx():
        return None
    mparams.use_extra_bufts = False
    return "no extra buffer types: llama.cpp's AMX repacked weights crash on batches > 1 here"


class LlamaCppEngine(Engine):
    name = "llamacpp"

    def __init__(self, spec: RunSpec) -> None:
        # llama.cpp's own OpenMP settings, not kvrun's: with OMP_WAIT_POLICY=PASSIVE (what
        # the kvrun command and the harness's usual environment set) its threads sleep
        # between graph nodes and single-stream decode drops from ~147 to ~27 tok/s here
        # (measured). libgomp reads the variable once, when llama.cpp loads it below.
        os.environ.pop("OMP_WAIT_POLICY", None)
        import llama_cpp as lc  # type: ignore[import-not-found]  # only in its venv
        import numpy as np

        self.lc, self.np = lc, np
        self.name = spec.options.get("label", "llamacpp")
        self.batched = bool(spec.options.get("batched", True))
        self.n_seq = len(spec.prompts) if self.batched and spec.workload == "throughput" else 1
        longest = max(len(p) for p in spec.prompts) + spec.max_tokens
        per_seq = -(-longest // 256) * 256  # KV cells per stream, rounded to 256

        self._silence_logs()
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        # One sequence on an AMX CPU: keep llama.cpp's AMX repacked weights (its fastest
        # decode here) and feed every llama_decode one token, prompts included (slower
        # TTFT); with several sequences a decode step is a batch, so no repack
        # (without_amx_repack says why).
        self.token_at_a_time = self.n_seq == 1 and has_amx()
        self.weights_note = (
            "AMX repacked weights, every llama_decode one token (batches > 1 crash here)"
            if self.token_at_a_time
            else without_amx_repack(lc, mparams)
        )
        self.model = lc.llama_model_load_from_file(spec.model.encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {spec.model}")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = per_seq * self.n_seq
        cparams.n_batch = N_BATCH
        cparams.n_ubatch = min(512, N_BATCH)
        cparams.n_seq_max = self.n_seq
        cparams.n_threads = spec.threads
        cparams.n_threads_batch = spec.threads
        cparams.kv_unified = False  # one KV stream per sequence: attention reads only its own
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(max(N_BATCH, self.n_seq), 0, self.n_seq)
        self.model_path = spec.model

    def _silence_logs(self) -> None:
        lc = self.lc

        @lc.llama_log_callback  # type: ignore[untyped-decorator]
        def _quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            return None

        self._log_cb = _quiet  # keep a reference: llama.cpp calls it later
        lc.llama_log_set(self._log_cb, ctypes.c_void_p(0))

    def versions(self) -> dict[str, str]:
        return {"llama_cpp_python": self.lc.__version__}

    def config(self) -> dict[str, Any]:
        mode = f"{self.n_seq} sequences per llama_batch" if self.batched else "one prompt at a time"
        config = {"gguf": self.model_path.rsplit("/", 1)[-1], "batching": mode}
        if self.weights_note is not None:
            config["weights"] = self.weights_note
        return config

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, wants_logits), at most N_BATCH of them."""
        if self.token_at_a_time and len(items) > 1:
            raise RuntimeError("this llama.cpp configuration decodes one token per call")
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(items)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, batch_index: int) -> int:
        ptr = self.lc.llama_get_logits_ith(self.ctx, batch_index)
        return int(self.np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def _generate_group(self, prompts: Sequence[list[int]], max_tokens: int) -> list[list[int]]:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        # Prefill: every prompt token, logits only at each prompt's last token.
        flat = [
            (tok, pos, seq, pos == len(p) - 1)
            for seq, p in enumerate(prompts)
            for pos, tok in enumerate(p)
        ]
        nexts: list[int] = [0] * len(prompts)
        per_call = 1 if self.token_at_a_time else N_BATCH
        for start in range(0, len(flat), per_call):
            chunk = flat[start : start + per_call]
            self._decode(chunk)
            for i, (_, _, seq, wants) in enumerate(chunk):
                if wants:
                    nexts[seq] = self._argmax(i)
        outs = [[t] for t in nexts]
        # Decode: one token per sequence per step.
        for step in range(1, max_tokens):
            self._decode([(outs[s][-1], len(p) + step - 1, s, True) for s, p in enumerate(prompts)])
            for s in range(len(prompts)):
                outs[s].append(self._argmax(s))
        return outs

    def generate(self, prompts: Sequence[list[int]], max_tokens: int) -> list[list[int]]:
        outs: list[list[int]] = []
        for start in range(0, len(prompts), self.n_seq):
            outs.extend(self._generate_group(prompts[start : start + self.n_seq], max_tokens))
        return outs


if __name__ == "__main__":
    raise SystemExit(main(LlamaCppEngine))
