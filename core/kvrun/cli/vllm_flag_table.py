"""Every flag of `vllm serve` and what `kvrun serve` does without it.

Read from vLLM's own parser (vllm/engine/arg_utils.py ``EngineArgs.add_cli_args`` and
``AsyncEngineArgs``, vllm/entrypoints/.../cli_args.py ``FrontendArgs`` and
``make_arg_parser``) as of the 0.2x-0.3x releases, grouped as ``vllm serve --help``
groups them, plus the flags older releases had and scripts still carry (marked
``removed``). The mechanism is in :mod:`kvrun.cli.vllm_flags`; docs/serving.md shows
this table (``kvrun serve --vllm-flags-markdown``).

How a verdict is chosen:

- KVRUN: kvrun's parser defines it with vLLM's meaning (a test holds the parser to it).
- REFUSE: kvrun does not do what the flag asks, and the answers would differ without
  it; ``accepts`` lists the values that ask for what kvrun does anyway (``-tp 1``).
- WARN: a pure tuning or logging knob: without it the same requests get the same
  answers; accepted with one warning that it has no effect.
"""

from __future__ import annotations

from typing import Any

from kvrun.cli.vllm_flags import Arity, Verdict, VllmFlag

__all__ = ["FLAGS"]

B, S, V, L, J, OPT = Arity.BOOL, Arity.SWITCH, Arity.VALUE, Arity.VALUES, Arity.JSON, Arity.OPTIONAL


def _flag(
    verdict: Verdict, names: str, group: str, arity: Arity, reason: str, **kw: Any
) -> VllmFlag:
    return VllmFlag(tuple(names.split()), group, arity, verdict, reason, **kw)


def _k(names: str, group: str, arity: Arity, note: str, **kw: Any) -> VllmFlag:
    return _flag(Verdict.KVRUN, names, group, arity, note, **kw)


def _r(names: str, group: str, arity: Arity, reason: str, **kw: Any) -> VllmFlag:
    return _flag(Verdict.REFUSE, names, group, arity, reason, **kw)


def _w(names: str, group: str, arity: Arity, reason: str, **kw: Any) -> VllmFlag:
    return _flag(Verdict.WARN, names, group, arity, reason, **kw)


_DIST = (
    "kvrun's parallelism is tensor and pipeline parallelism (the mp and ray executors) and "
    "data parallelism behind one frontend (docs/distributed.md); this part of vLLM's is not built"
)
_LORA = (
    "kvrun's LoRA adapters are plain PEFT LoRA on the attention and MLP projections, in the "
    "model's dtype"
)
_MM = (
    "kvrun's media inputs (docs/serving.md, Media inputs) have no such setting: media are "
    "decoded by the frontend and processed by the model's own processor settings"
)
_SO_DEFAULTS = (
    "kvrun takes this per request, not as a server-wide default: the request's "
    "structured_outputs object has disable_fallback, disable_any_whitespace and "
    "disable_additional_properties"
)
_NO_BUDGETS = (
    "kvrun does not limit or steer reasoning (no thinking budgets); --reasoning-parser separates it"
)
_SPEC = "speculative decoding is not built"
_MAMBA = "kvrun has no Mamba (state-space) models"
_DISAGG = "disaggregated serving (KV or encoder-cache transfer between engines) is not built"
_CUDA_GRAPHS = (
    "kvrun's platforms choose their decode-graph sizes themselves "
    "(graphs run with --no-enforce-eager)"
)
_KERNELS = "kvrun's kernels come from the platform plugin; there is no backend to pick here"
_METRICS = "kvrun exports the metrics docs/serving.md lists and no others"
_LOGGING = "kvrun writes no such log"
_TLS = "kvrun serves plain HTTP"
_TLS_INSTEAD = "terminate TLS in a reverse proxy in front of it"
_CORS = "kvrun sends no CORS headers (browsers on other origins are refused)"
_CORS_INSTEAD = "a reverse proxy that adds them"
_OFFLOAD = "weight offloading is not built; the cpu platform keeps weights in host memory anyway"
_REMOVED = "vLLM removed it; "

FLAGS: tuple[VllmFlag, ...] = (
    # `vllm serve` itself
    _k(
        "--headless",
        "serve",
        S,
        "a data-parallel rank's engine core without a frontend: it registers with rank 0 "
        "at --data-parallel-address:--data-parallel-rpc-port",
    ),
    _r("--api-server-count -asc", "serve", V, "kvrun runs one API server process", accepts=("1",)),
    _r(
        "--config",
        "serve",
        V,
        "kvrun reads no YAML file of flags",
        instead="give the flags on the command line",
    ),
    _r("--grpc", "serve", S, "kvrun serves HTTP only"),
    # Frontend
    _k("--host", "Frontend", V, "default 127.0.0.1 (vLLM: all interfaces)"),
    _k("--port", "Frontend", V, "default 8000"),
    _r(
        "--uds",
        "Frontend",
        V,
        "kvrun listens on TCP only",
        instead="a reverse proxy that listens on the socket",
    ),
    _k("--uvicorn-log-level", "Frontend", V, "as vLLM"),
    _k("--disable-uvicorn-access-log", "Frontend", B, "as vLLM"),
    _w(
        "--disable-access-log-for-endpoints",
        "Frontend",
        V,
        "kvrun's access log cannot skip paths",
        instead="--disable-uvicorn-access-log",
    ),
    _r("--allow-credentials", "Frontend", B, _CORS, instead=_CORS_INSTEAD, accepts=("false",)),
    _r("--allowed-origins", "Frontend", V, _CORS, instead=_CORS_INSTEAD),
    _r("--allowed-methods", "Frontend", V, _CORS, instead=_CORS_INSTEAD),
    _r("--allowed-headers", "Frontend", V, _CORS, instead=_CORS_INSTEAD),
    _k("--api-key", "Frontend", V, "one key (vLLM takes several); wins over VLLM_API_KEY"),
    _r("--ssl-keyfile", "Frontend", V, _TLS, instead=_TLS_INSTEAD),
    _r("--ssl-certfile", "Frontend", V, _TLS, instead=_TLS_INSTEAD),
    _r("--ssl-ca-certs", "Frontend", V, _TLS, instead=_TLS_INSTEAD),
    _r("--enable-ssl-refresh", "Frontend", B, _TLS, instead=_TLS_INSTEAD, accepts=("false",)),
    _r("--ssl-cert-reqs", "Frontend", V, _TLS, instead=_TLS_INSTEAD, accepts=("0",)),
    _r("--ssl-ciphers", "Frontend", V, _TLS, instead=_TLS_INSTEAD),
    _k("--root-path", "Frontend", V, "as vLLM; must start with '/'"),
    _r("--middleware", "Frontend", V, "kvrun loads no ASGI middleware from the command line"),
    _r(
        "--enable-request-id-headers",
        "Frontend",
        B,
        "kvrun sends no X-Request-Id header",
        accepts=("false",),
    ),
    _r(
        "--disable-fastapi-docs",
        "Frontend",
        B,
        "kvrun always serves /docs, /redoc and /openapi.json (behind the API key when one is set)",
        instead="block them at a reverse proxy",
        accepts=("false",),
    ),
    _r(
        "--enable-offline-docs",
        "Frontend",
        B,
        "kvrun's /docs page loads its assets from FastAPI's CDN",
        accepts=("false",),
    ),
    _r(
        "--h11-max-incomplete-event-size",
        "Frontend",
        V,
        "kvrun bounds requests with its own limits",
        instead="--max-header-bytes and --max-request-body-bytes",
    ),
    _r(
        "--h11-max-header-count",
        "Frontend",
        V,
        "kvrun bounds headers by their total size",
        instead="--max-header-bytes",
    ),
    _r(
        "--enable-flash-late-interaction",
        "Frontend",
        B,
        "late-interaction (ColBERT) scoring is not built",
        accepts=("false",),
    ),
    _r("--data-parallel-supervisor-port", "Frontend", V, _DIST),
    _r("--dp-supervisor-probe-interval-s", "Frontend", V, _DIST),
    _r("--dp-supervisor-probe-timeout-s", "Frontend", V, _DIST),
    _r("--dp-supervisor-probe-failure-threshold", "Frontend", V, _DIST),
    _k("--lora-modules", "Frontend", L, "adapters served as models: name=path or vLLM's JSON"),
    _r(
        "--chat-template",
        "Frontend",
        V,
        "kvrun renders the model's own chat template",
        instead="put the template in the checkpoint's tokenizer_config.json, or send `chat_template` in requests with --trust-request-chat-template",
    ),
    _r(
        "--chat-template-content-format",
        "Frontend",
        V,
        "kvrun joins a message's text parts into one string (vLLM's `string` format)",
        accepts=("string",),
    ),
    _k(
        "--trust-request-chat-template",
        "Frontend",
        B,
        "as vLLM; every render is bounded in time and size",
    ),
    _r(
        "--default-chat-template-kwargs",
        "Frontend",
        J,
        "kvrun has no server-wide template arguments",
        instead="send `chat_template_kwargs` in each request",
    ),
    _r("--reasoning-effort-budgets", "Frontend", J, _NO_BUDGETS),
    _r(
        "--response-role",
        "Frontend",
        V,
        "kvrun's replies always have the role `assistant`",
        accepts=("assistant",),
    ),
    _r(
        "--return-tokens-as-token-ids",
        "Frontend",
        B,
        "kvrun's logprobs name tokens by their text",
        accepts=("false",),
    ),
    _k("--enable-auto-tool-choice", "Frontend", B, "with --tool-call-parser"),
    _k("--exclude-tools-when-tool-choice-none", "Frontend", B, "as vLLM"),
    _k("--tool-call-parser", "Frontend", V, "hermes, llama3_json, mistral, pythonic, ..."),
    _k("--tool-parser-plugin", "Frontend", V, "refused at start: no tool parser plugins"),
    _r(
        "--tool-server",
        "Frontend",
        V,
        "kvrun runs no built-in tools (MCP or demo tool servers); the client runs its tools",
    ),
    _r(
        "--log-config-file",
        "Frontend",
        V,
        "the logging configuration comes from the environment",
        instead="VLLM_LOGGING_CONFIG_PATH",
    ),
    _w("--max-log-len", "Frontend", V, "kvrun logs no prompts"),
    _r(
        "--enable-prompt-tokens-details",
        "Frontend",
        B,
        "kvrun's usage has no prompt_tokens_details",
        accepts=("false",),
    ),
    _r(
        "--enable-per-request-metrics",
        "Frontend",
        B,
        "kvrun's answers carry no per-request timings",
        instead="the latency histograms of /metrics",
        accepts=("false",),
    ),
    _r(
        "--enable-server-load-tracking",
        "Frontend",
        B,
        "kvrun has no /load route",
        instead="vllm:num_requests_running and vllm:num_requests_waiting on /metrics",
        accepts=("false",),
    ),
    _r(
        "--enable-force-include-usage",
        "Frontend",
        B,
        "kvrun adds usage to a stream only when the request asks (stream_options.include_usage)",
        accepts=("false",),
    ),
    _w(
        "--sse-keep-alive-interval",
        "Frontend",
        V,
        "kvrun sends no SSE keep-alive comments",
        accepts=("0",),
    ),
    _r(
        "--enable-tokenizer-info-endpoint",
        "Frontend",
        B,
        "kvrun has no /tokenizer_info route",
        accepts=("false",),
    ),
    _w("--enable-log-outputs", "Frontend", B, _LOGGING, accepts=("false",)),
    _w("--enable-log-deltas", "Frontend", B, _LOGGING, accepts=("true", "false")),
    _r(
        "--cohere-is-reasoning-model",
        "Frontend",
        B,
        "kvrun has no Cohere route",
        accepts=("true", "false"),
    ),
    _r("--cohere-format", "Frontend", V, "kvrun has no Cohere route"),
    _w(
        "--log-error-stack",
        "Frontend",
        B,
        "kvrun always logs the traceback of a 500",
        accepts=("true",),
    ),
    _r(
        "--tokens-only",
        "Frontend",
        B,
        "kvrun has no tokens-in/tokens-out-only mode",
        accepts=("false",),
    ),
    _r(
        "--fingerprint-mode",
        "Frontend",
        V,
        "kvrun's answers carry no system_fingerprint",
        accepts=("none",),
    ),
    _r("--fingerprint-value", "Frontend", V, "kvrun's answers carry no system_fingerprint"),
    # ModelConfig
    _k(
        "--model",
        "ModelConfig",
        V,
        "also the positional MODEL; path, hub id, GGUF file or s3:// URI",
    ),
    _k("--runner", "ModelConfig", V, "auto, generate or pooling (embeddings, scores, classes)"),
    _k("--convert", "ModelConfig", V, "auto, none, embed (a causal LM) or classify (a classifier)"),
    _k("--tokenizer", "ModelConfig", V, "as vLLM"),
    _r(
        "--tokenizer-mode",
        "ModelConfig",
        V,
        "kvrun reads the Hugging Face fast tokenizer (tokenizer.json) or a GGUF's",
        accepts=("auto", "hf"),
    ),
    _k(
        "--trust-remote-code",
        "ModelConfig",
        B,
        "lets a config.json with auto_map load with kvrun's own implementation of its architecture; kvrun never runs a checkpoint's code",
    ),
    _k("--dtype", "ModelConfig", V, "auto lets the platform pick"),
    _k("--seed", "ModelConfig", V, "as vLLM (default 0)"),
    _r("--hf-config-path", "ModelConfig", V, "kvrun reads config.json from the model"),
    _k("--allowed-local-media-path", "ModelConfig", V, "file:// media only under it"),
    _k("--allowed-media-domains", "ModelConfig", L, "media fetched from these hosts only"),
    _k("--revision", "ModelConfig", V, "as vLLM"),
    _w("--code-revision", "ModelConfig", V, "kvrun never runs a checkpoint's code"),
    _r(
        "--tokenizer-revision",
        "ModelConfig",
        V,
        "kvrun reads the tokenizer at the model's revision",
        instead="--revision, or --tokenizer with a local directory",
    ),
    _k("--max-model-len", "ModelConfig", V, "an integer (vLLM also reads 32k, 1M)"),
    _k(
        "--quantization -q",
        "ModelConfig",
        V,
        "gguf: a GGUF file's Q8_0/Q4_0/Q4_1/Q4_K/Q6_K matrices run as stored; awq, fp8: that "
        "checkpoint dequantized at load; unset: dequantized at load; vLLM's GPU kernels "
        "(awq_marlin, ...) refused",
    ),
    _w(
        "--allow-deprecated-quantization",
        "ModelConfig",
        B,
        "kvrun refuses no quantization as deprecated",
        accepts=("false",),
    ),
    _k(
        "--enforce-eager",
        "ModelConfig",
        B,
        "default on in kvrun (vLLM: off); --no-enforce-eager compiles and captures decode graphs",
    ),
    _r(
        "--enable-return-routed-experts",
        "ModelConfig",
        B,
        "kvrun does not report routed experts",
        accepts=("false",),
    ),
    _k("--max-logprobs", "ModelConfig", V, "as vLLM (default 20)"),
    _r(
        "--logprobs-mode",
        "ModelConfig",
        V,
        "kvrun's logprobs are log_softmax of the unprocessed logits (vLLM's default)",
        accepts=("raw_logprobs",),
    ),
    _r(
        "--disable-sliding-window",
        "ModelConfig",
        B,
        "kvrun keeps sliding windows as the model defines them",
        accepts=("false",),
    ),
    _w(
        "--disable-cascade-attn",
        "ModelConfig",
        B,
        "kvrun has no cascade attention",
        accepts=("true",),
    ),
    _r(
        "--skip-tokenizer-init",
        "ModelConfig",
        B,
        "kvrun's routes need the tokenizer",
        accepts=("false",),
    ),
    _r(
        "--enable-prompt-embeds",
        "ModelConfig",
        B,
        "kvrun takes prompts as text or token ids",
        accepts=("false",),
    ),
    _k("--served-model-name", "ModelConfig", V, "one name (vLLM takes several)"),
    _r(
        "--config-format",
        "ModelConfig",
        V,
        "kvrun reads Hugging Face config.json (or a GGUF's metadata)",
        accepts=("auto", "hf"),
    ),
    _r(
        "--hf-token",
        "ModelConfig",
        OPT,
        "the hub token comes from the environment",
        instead="HF_TOKEN",
    ),
    _r(
        "--hf-overrides",
        "ModelConfig",
        J,
        "kvrun applies no overrides to config.json",
        instead="edit a local copy of config.json",
    ),
    _r(
        "--model-class-overrides",
        "ModelConfig",
        J,
        "kvrun picks the implementation from config.json's architecture",
    ),
    _k("--pooler-config", "ModelConfig", J, "pooling_type (LAST, MEAN, CLS) and normalize"),
    _r(
        "--generation-config",
        "ModelConfig",
        V,
        "kvrun takes only the EOS ids from generation_config.json, not its sampling defaults (vLLM's `vllm` mode)",
        accepts=("vllm",),
    ),
    _r(
        "--override-generation-config",
        "ModelConfig",
        J,
        "kvrun applies no server-wide sampling defaults",
        instead="set the sampling fields in each request",
    ),
    _r("--enable-sleep-mode", "ModelConfig", B, "kvrun has no sleep mode", accepts=("false",)),
    _w(
        "--enable-cumem-allocator",
        "ModelConfig",
        B,
        "kvrun's platforms allocate device memory themselves",
        accepts=("false",),
    ),
    _r(
        "--model-impl",
        "ModelConfig",
        V,
        "kvrun runs its own implementation of each architecture",
        accepts=("auto", "vllm"),
    ),
    _r("--override-attention-dtype", "ModelConfig", V, "attention runs in the model dtype"),
    _r("--logits-processors", "ModelConfig", L, "kvrun loads no custom logits processors"),
    _r(
        "--use-fp64-gumbel",
        "ModelConfig",
        B,
        "kvrun's sampler draws in float32",
        accepts=("false",),
    ),
    _r("--io-processor-plugin", "ModelConfig", V, "kvrun has no input/output processor plugins"),
    _w(
        "--renderer-num-workers",
        "ModelConfig",
        V,
        "kvrun renders chat templates off the event loop in its own thread pool",
        accepts=("1",),
    ),
    # LoadConfig
    _k(
        "--load-format",
        "LoadConfig",
        V,
        "auto, safetensors, pt, gguf, dummy; any other vLLM format is refused by name",
    ),
    _k("--download-dir", "LoadConfig", V, "as vLLM"),
    _w(
        "--safetensors-load-strategy",
        "LoadConfig",
        V,
        "kvrun reads safetensors one way (memory-mapped)",
    ),
    _w(
        "--safetensors-prefetch-num-threads",
        "LoadConfig",
        V,
        "kvrun does not prefetch safetensors files",
    ),
    _w(
        "--safetensors-prefetch-block-size",
        "LoadConfig",
        V,
        "kvrun does not prefetch safetensors files",
    ),
    _r(
        "--model-loader-extra-config",
        "LoadConfig",
        J,
        "kvrun's loaders take no extra configuration",
    ),
    _w(
        "--ignore-patterns", "LoadConfig", L, "kvrun downloads only the files its load format reads"
    ),
    _w(
        "--use-tqdm-on-load",
        "LoadConfig",
        B,
        "kvrun shows no progress bar while loading",
        accepts=("false",),
    ),
    _w(
        "--pt-load-map-location",
        "LoadConfig",
        V,
        "kvrun reads .pt/.bin weights on the host, then moves them to the platform",
    ),
    # AttentionConfig
    _k(
        "--attention-backend",
        "AttentionConfig",
        V,
        "the platform's attention backend; wins over VLLM_ATTENTION_BACKEND",
    ),
    # MambaConfig
    _r("--mamba-backend", "MambaConfig", V, _MAMBA),
    _r("--enable-mamba-cache-stochastic-rounding", "MambaConfig", B, _MAMBA, accepts=("false",)),
    _r("--mamba-cache-philox-rounds", "MambaConfig", V, _MAMBA, accepts=("0",)),
    # StructuredOutputsConfig
    _k("--reasoning-parser", "StructuredOutputsConfig", V, "deepseek_r1 or qwen3"),
    _r(
        "--reasoning-parser-plugin",
        "StructuredOutputsConfig",
        V,
        "kvrun loads no reasoning parser plugins",
        instead="a built-in --reasoning-parser",
    ),
    # ParallelConfig
    _k(
        "--distributed-executor-backend",
        "ParallelConfig",
        V,
        "uni (in-process), mp (worker processes on this machine) or ray (Ray actors)",
    ),
    _k("--pipeline-parallel-size -pp", "ParallelConfig", V, "as vLLM"),
    _r("--master-addr", "ParallelConfig", V, _DIST, accepts=("127.0.0.1",)),
    _r("--master-port", "ParallelConfig", V, _DIST),
    _r("--nnodes -n", "ParallelConfig", V, _DIST, accepts=("1",)),
    _r("--node-rank -r", "ParallelConfig", V, _DIST, accepts=("0",)),
    _r("--distributed-timeout-seconds", "ParallelConfig", V, _DIST),
    _r("--cpu-distributed-timeout-seconds", "ParallelConfig", V, _DIST),
    _r(
        "--numa-bind",
        "ParallelConfig",
        B,
        "kvrun does not bind its own threads to NUMA nodes",
        instead="numactl, or VLLM_CPU_OMP_THREADS_BIND on the cpu platform",
        accepts=("false",),
    ),
    _r(
        "--numa-bind-nodes",
        "ParallelConfig",
        L,
        "kvrun does not bind its own threads to NUMA nodes",
        instead="numactl, or VLLM_CPU_OMP_THREADS_BIND on the cpu platform",
    ),
    _r(
        "--numa-bind-cpus",
        "ParallelConfig",
        L,
        "kvrun does not bind its own threads to NUMA nodes",
        instead="numactl, or VLLM_CPU_OMP_THREADS_BIND on the cpu platform",
    ),
    _k("--tensor-parallel-size -tp", "ParallelConfig", V, "as vLLM"),
    _r("--decode-context-parallel-size -dcp", "ParallelConfig", V, _DIST, accepts=("1",)),
    _r("--dcp-comm-backend", "ParallelConfig", V, _DIST),
    _r("--dcp-kv-cache-interleave-size", "ParallelConfig", V, _DIST, accepts=("1",)),
    _r("--cp-kv-cache-interleave-size", "ParallelConfig", V, _DIST, accepts=("1",)),
    _r("--prefill-context-parallel-size -pcp", "ParallelConfig", V, _DIST, accepts=("1",)),
    _k(
        "--data-parallel-size -dp",
        "ParallelConfig",
        V,
        "as vLLM: N engine cores behind one frontend (or VLLM_DP_SIZE)",
    ),
    _r(
        "--data-parallel-rank -dpn",
        "ParallelConfig",
        V,
        "kvrun's data-parallel ranks share rank 0's frontend; vLLM's external load "
        "balancing (one API server per rank) is not built",
        instead="--headless --data-parallel-start-rank R (or VLLM_DP_RANK=R)",
    ),
    _k(
        "--data-parallel-start-rank -dpr",
        "ParallelConfig",
        V,
        "the rank a --headless process runs (or VLLM_DP_RANK)",
    ),
    _k(
        "--data-parallel-size-local -dpl",
        "ParallelConfig",
        V,
        "ranks this machine runs: all by default, 1 for an externally launched rank",
    ),
    _k(
        "--data-parallel-address -dpa",
        "ParallelConfig",
        V,
        "rank 0's IP address; rank 0 listens on it only (or VLLM_DP_MASTER_IP; default 127.0.0.1)",
    ),
    _k(
        "--data-parallel-rpc-port -dpp",
        "ParallelConfig",
        V,
        "the port rank 0 listens on for the other ranks (or VLLM_DP_MASTER_PORT; default 29550)",
    ),
    _r("--data-parallel-backend -dpb", "ParallelConfig", V, _DIST, accepts=("mp",)),
    _r("--data-parallel-hybrid-lb -dph", "ParallelConfig", B, _DIST, accepts=("false",)),
    _r("--data-parallel-external-lb -dpe", "ParallelConfig", B, _DIST, accepts=("false",)),
    _r(
        "--data-parallel-multi-port-external-lb -dpm",
        "ParallelConfig",
        B,
        _DIST,
        accepts=("false",),
    ),
    _r("--enable-expert-parallel -ep", "ParallelConfig", B, _DIST, accepts=("false",)),
    _r("--enable-ep-weight-filter", "ParallelConfig", B, _DIST, accepts=("false",)),
    _r("--all2all-backend", "ParallelConfig", V, _DIST),
    _r("--enable-dbo", "ParallelConfig", B, _DIST, accepts=("false",)),
    _r("--ubatch-size", "ParallelConfig", V, _DIST, accepts=("0",)),
    _r("--enable-elastic-ep", "ParallelConfig", B, _DIST, accepts=("false",)),
    _r("--dbo-decode-token-threshold", "ParallelConfig", V, _DIST),
    _r("--dbo-prefill-token-threshold", "ParallelConfig", V, _DIST),
    _r("--disable-nccl-for-dp-synchronization", "ParallelConfig", B, _DIST),
    _r("--enable-eplb", "ParallelConfig", B, _DIST, accepts=("false",)),
    _r("--eplb-config", "ParallelConfig", J, _DIST),
    _r("--expert-placement-strategy", "ParallelConfig", V, _DIST, accepts=("linear",)),
    _w("--max-parallel-loading-workers", "ParallelConfig", V, "kvrun loads weights in one process"),
    _r("--ray-workers-use-nsight", "ParallelConfig", B, _DIST, accepts=("false",)),
    _k(
        "--disable-custom-all-reduce",
        "ParallelConfig",
        B,
        "as vLLM: cuda's all-reduce over peer-to-peer memory is not used (docs/distributed.md)",
    ),
    _r(
        "--worker-cls",
        "ParallelConfig",
        V,
        "kvrun loads no worker classes by name",
        accepts=("auto",),
    ),
    _r(
        "--worker-extension-cls",
        "ParallelConfig",
        V,
        "kvrun loads no worker classes by name",
        accepts=("",),
    ),
    # CacheConfig
    _k("--block-size", "CacheConfig", V, "default: the platform's (16; hpu 128)"),
    _k(
        "--gpu-memory-utilization",
        "CacheConfig",
        V,
        "GPU platforms size the KV cache from it; cpu uses VLLM_CPU_KVCACHE_SPACE",
    ),
    _r(
        "--kv-cache-memory-bytes",
        "CacheConfig",
        V,
        "kvrun sizes the KV cache from the platform's budget",
        instead="--num-kv-blocks, --gpu-memory-utilization, or VLLM_CPU_KVCACHE_SPACE on cpu",
    ),
    _k(
        "--kv-cache-dtype",
        "CacheConfig",
        V,
        "auto, fp8, fp8_e4m3, fp8_e5m2 where the platform stores them (cpu: auto)",
    ),
    _k(
        "--num-gpu-blocks-override",
        "CacheConfig",
        V,
        "the KV blocks to allocate, overriding the platform's budget",
        maps_to="--num-kv-blocks",
    ),
    _k("--enable-prefix-caching", "CacheConfig", B, "default on"),
    _w(
        "--prefix-caching-hash-algo",
        "CacheConfig",
        V,
        "kvrun's prefix-cache keys are chained sha256 hashes",
        accepts=("sha256",),
    ),
    _r("--prefix-match-unit", "CacheConfig", V, "kvrun's prefix cache matches whole blocks"),
    _r(
        "--calculate-kv-scales",
        "CacheConfig",
        B,
        "an fp8 KV cache in kvrun measures its scales at each layer's first write",
        accepts=("true",),
    ),
    _r(
        "--kv-cache-dtype-skip-layers",
        "CacheConfig",
        L,
        "every layer's KV cache has the one --kv-cache-dtype",
    ),
    _r(
        "--kv-sharing-fast-prefill",
        "CacheConfig",
        B,
        "kvrun shares no KV cache across layers",
        accepts=("false",),
    ),
    _r("--mamba-cache-dtype", "CacheConfig", V, _MAMBA, accepts=("auto",)),
    _r("--mamba-ssm-cache-dtype", "CacheConfig", V, _MAMBA, accepts=("auto",)),
    _r("--mamba-block-size", "CacheConfig", V, _MAMBA),
    _r("--mamba-cache-mode", "CacheConfig", V, _MAMBA, accepts=("none",)),
    _r("--kv-offloading-size", "CacheConfig", V, "KV-cache offloading is not built"),
    _r("--kv-offloading-backend", "CacheConfig", V, "KV-cache offloading is not built"),
    # OffloadConfig
    _r("--offload-backend", "OffloadConfig", V, _OFFLOAD, accepts=("auto",)),
    _r("--cpu-offload-gb", "OffloadConfig", V, _OFFLOAD, accepts=("0",)),
    _r("--cpu-offload-params", "OffloadConfig", L, _OFFLOAD),
    _r("--offload-group-size", "OffloadConfig", V, _OFFLOAD, accepts=("0",)),
    _r("--offload-num-in-group", "OffloadConfig", V, _OFFLOAD, accepts=("1",)),
    _r("--offload-prefetch-step", "OffloadConfig", V, _OFFLOAD, accepts=("1",)),
    _r("--offload-params", "OffloadConfig", L, _OFFLOAD),
    # MultiModalConfig
    _r("--language-model-only", "MultiModalConfig", B, _MM, accepts=("false",)),
    _k("--limit-mm-per-prompt", "MultiModalConfig", J, "a count per kind (default 8)"),
    _r("--enable-mm-embeds", "MultiModalConfig", B, _MM, accepts=("false",)),
    _r("--media-io-kwargs", "MultiModalConfig", J, _MM),
    _k(
        "--mm-processor-kwargs",
        "MultiModalConfig",
        J,
        "handed to the model's processor (Qwen2-VL: min_pixels, max_pixels); unknown keys refused",
    ),
    _r("--mm-processor-cache-gb", "MultiModalConfig", V, _MM),
    _r("--mm-processor-cache-type", "MultiModalConfig", V, _MM),
    _r("--mm-shm-cache-max-object-size-mb", "MultiModalConfig", V, _MM),
    _r("--mm-encoder-only", "MultiModalConfig", B, _MM, accepts=("false",)),
    _r("--mm-encoder-tp-mode", "MultiModalConfig", V, _MM),
    _r("--mm-encoder-attn-backend", "MultiModalConfig", V, _MM),
    _r("--mm-encoder-attn-dtype", "MultiModalConfig", V, _MM),
    _r("--mm-encoder-fp8-scale-path", "MultiModalConfig", V, _MM),
    _r("--mm-encoder-fp8-scale-save-path", "MultiModalConfig", V, _MM),
    _r("--mm-encoder-fp8-scale-save-margin", "MultiModalConfig", V, _MM),
    _r("--interleave-mm-strings", "MultiModalConfig", B, _MM, accepts=("false",)),
    _r("--skip-mm-profiling", "MultiModalConfig", B, _MM, accepts=("false",)),
    _r("--video-pruning-rate", "MultiModalConfig", V, _MM),
    _r("--mm-tensor-ipc", "MultiModalConfig", V, _MM),
    _r("--mm-ipc-gpu-memory-gb", "MultiModalConfig", V, _MM),
    # LoRAConfig
    _k("--enable-lora", "LoRAConfig", B, "PEFT LoRA adapters next to the base model"),
    _k("--max-loras", "LoRAConfig", V, "device slots: distinct adapters running at once"),
    _k("--max-lora-rank", "LoRAConfig", V, "the highest adapter rank accepted"),
    _r("--lora-dtype", "LoRAConfig", V, _LORA, accepts=("auto",)),
    _r("--enable-tower-connector-lora", "LoRAConfig", B, _LORA, accepts=("false",)),
    _k("--max-cpu-loras", "LoRAConfig", V, "adapters kept read in host memory (LRU)"),
    _r("--fully-sharded-loras", "LoRAConfig", B, _LORA, accepts=("false",)),
    _r("--lora-target-modules", "LoRAConfig", L, _LORA),
    _r("--default-mm-loras", "LoRAConfig", J, _LORA),
    _r("--specialize-active-lora", "LoRAConfig", B, _LORA, accepts=("false",)),
    _r("--enable-mixed-moe-lora-format", "LoRAConfig", B, _LORA, accepts=("false",)),
    _r("--enable-moe-shared-loras", "LoRAConfig", B, _LORA, accepts=("false",)),
    # ObservabilityConfig
    _w("--show-hidden-metrics-for-version", "ObservabilityConfig", V, _METRICS),
    _r("--otlp-traces-endpoint", "ObservabilityConfig", V, "OpenTelemetry tracing is not built"),
    _r("--collect-detailed-traces", "ObservabilityConfig", V, "OpenTelemetry tracing is not built"),
    _w("--kv-cache-metrics", "ObservabilityConfig", B, _METRICS, accepts=("false",)),
    _w("--kv-cache-metrics-sample", "ObservabilityConfig", V, _METRICS),
    _w("--cudagraph-metrics", "ObservabilityConfig", B, _METRICS, accepts=("false",)),
    _w(
        "--enable-layerwise-nvtx-tracing",
        "ObservabilityConfig",
        B,
        "kvrun adds no NVTX ranges",
        accepts=("false",),
    ),
    _w("--enable-mfu-metrics", "ObservabilityConfig", B, _METRICS, accepts=("false",)),
    _w(
        "--enable-logging-iteration-details", "ObservabilityConfig", B, _LOGGING, accepts=("false",)
    ),
    _w("--enable-mm-processor-stats", "ObservabilityConfig", B, _METRICS, accepts=("false",)),
    _w("--jit-monitor-mode", "ObservabilityConfig", V, "kvrun has no JIT monitor"),
    _w(
        "--jit-monitor-verbose",
        "ObservabilityConfig",
        B,
        "kvrun has no JIT monitor",
        accepts=("false",),
    ),
    # SchedulerConfig
    _k(
        "--max-num-batched-tokens",
        "SchedulerConfig",
        V,
        "an integer; default 2048 with chunked prefill, else max-model-len",
    ),
    _k("--max-num-seqs", "SchedulerConfig", V, "default 256"),
    _w(
        "--max-num-scheduled-tokens",
        "SchedulerConfig",
        V,
        "kvrun schedules up to --max-num-batched-tokens per step",
    ),
    _w(
        "--max-num-partial-prefills",
        "SchedulerConfig",
        V,
        "kvrun's scheduler has no partial-prefill limits",
        accepts=("1",),
    ),
    _w(
        "--max-long-partial-prefills",
        "SchedulerConfig",
        V,
        "kvrun's scheduler has no partial-prefill limits",
        accepts=("1",),
    ),
    _w(
        "--long-prefill-token-threshold",
        "SchedulerConfig",
        V,
        "kvrun's scheduler has no partial-prefill limits",
        accepts=("0",),
    ),
    _r(
        "--scheduling-policy",
        "SchedulerConfig",
        V,
        "kvrun schedules first come, first served",
        accepts=("fcfs",),
    ),
    _k("--enable-chunked-prefill", "SchedulerConfig", B, "default on"),
    _r("--disable-chunked-mm-input", "SchedulerConfig", B, _MM, accepts=("false",)),
    _r("--scheduler-cls", "SchedulerConfig", V, "kvrun loads no scheduler classes by name"),
    _w(
        "--scheduler-reserve-full-isl",
        "SchedulerConfig",
        B,
        "kvrun's scheduler admits a request when its prompt's blocks fit",
    ),
    _w(
        "--prefill-schedule-interval",
        "SchedulerConfig",
        V,
        "kvrun schedules prefills every step",
        accepts=("1",),
    ),
    _w(
        "--watermark",
        "SchedulerConfig",
        V,
        "kvrun's block manager keeps no watermark",
        accepts=("0",),
    ),
    _w(
        "--disable-hybrid-kv-cache-manager",
        "SchedulerConfig",
        B,
        "kvrun has one KV-cache manager",
        accepts=("true",),
    ),
    _w(
        "--async-scheduling",
        "SchedulerConfig",
        B,
        "kvrun schedules each step after the last one's tokens are back",
        accepts=("false",),
    ),
    _w(
        "--stream-interval",
        "SchedulerConfig",
        V,
        "kvrun streams every step's tokens as they come",
        accepts=("1",),
    ),
    # CompilationConfig
    _w("--cudagraph-capture-sizes", "CompilationConfig", L, _CUDA_GRAPHS),
    _w("--max-cudagraph-capture-size", "CompilationConfig", V, _CUDA_GRAPHS),
    # KernelConfig
    _r("--ir-op-priority", "KernelConfig", J, _KERNELS),
    _w("--enable-flashinfer-autotune", "KernelConfig", B, _KERNELS),
    _w("--moe-backend", "KernelConfig", V, _KERNELS, accepts=("auto",)),
    _w("--linear-backend", "KernelConfig", V, _KERNELS, accepts=("auto",)),
    _w("--enable-cutedsl-warmup", "KernelConfig", B, _KERNELS),
    _w("--enable-bf16x3-router-gemm", "KernelConfig", B, _KERNELS),
    _w("--gdn-prefill-backend", "KernelConfig", V, _KERNELS),
    # VllmConfig
    _r("--speculative-config -sc", "VllmConfig", J, _SPEC),
    _r("--spec-method", "VllmConfig", V, _SPEC),
    _r("--spec-model", "VllmConfig", V, _SPEC),
    _r("--spec-tokens", "VllmConfig", V, _SPEC),
    _r("--kv-transfer-config", "VllmConfig", J, _DISAGG),
    _r("--kv-events-config", "VllmConfig", J, "kvrun publishes no KV-cache events"),
    _r("--ec-transfer-config", "VllmConfig", J, _DISAGG),
    _r(
        "--compilation-config -cc",
        "VllmConfig",
        J,
        "kvrun's compilation has one switch",
        instead="--no-enforce-eager",
    ),
    _r(
        "--attention-config -ac",
        "VllmConfig",
        J,
        "kvrun's attention has one setting",
        instead="--attention-backend",
    ),
    _r("--reasoning-config", "VllmConfig", J, _NO_BUDGETS),
    _r("--kernel-config", "VllmConfig", J, _KERNELS),
    _r(
        "--additional-config",
        "VllmConfig",
        J,
        "kvrun's platforms take their settings from VLLM_* variables",
        instead="the platform's variables (kvrun env)",
    ),
    _k("--structured-outputs-config", "VllmConfig", J, "backend: auto, xgrammar or guidance"),
    _r(
        "--profiler-config",
        "VllmConfig",
        J,
        "the profiler is configured from the environment",
        instead="VLLM_TORCH_PROFILER_DIR",
    ),
    _r(
        "--optimization-level -O",
        "VllmConfig",
        V,
        "kvrun's compilation has one switch: -O0 is kvrun's default (eager)",
        instead="--no-enforce-eager to compile",
        accepts=("0",),
    ),
    _w(
        "--performance-mode",
        "VllmConfig",
        V,
        "kvrun has no performance modes",
        accepts=("balanced",),
    ),
    _r(
        "--weight-transfer-config", "VllmConfig", J, "kvrun loads weights once, from the checkpoint"
    ),
    _r("--diffusion-config", "VllmConfig", J, "kvrun has no diffusion models"),
    # engine flags outside the groups
    _k("--disable-log-stats", "engine", S, "accepted; kvrun logs no periodic statistics yet"),
    _w("--aggregate-engine-logging", "engine", S, "kvrun has one engine"),
    _r(
        "--fail-on-environ-validation",
        "engine",
        B,
        "kvrun warns about unknown VLLM_* variables and refuses bad values; it does not fail on unknown names",
        accepts=("false",),
    ),
    _k(
        "--shutdown-timeout",
        "engine",
        V,
        "seconds in-flight requests get after SIGTERM, then they end with finish_reason abort; default 5 (vLLM: 0)",
    ),
    _w("--enable-log-requests", "engine", B, "kvrun has no request log", accepts=("false",)),
    # flags of older vLLM releases that scripts still carry
    _w(
        "--disable-log-requests",
        "engine",
        B,
        "kvrun has no request log",
        accepts=("true",),
        removed=True,
    ),
    _k(
        "--guided-decoding-backend",
        "StructuredOutputsConfig",
        V,
        "auto, xgrammar or guidance, as --structured-outputs-config's backend",
        removed=True,
    ),
    _r(
        "--guided-decoding-disable-fallback",
        "StructuredOutputsConfig",
        B,
        _SO_DEFAULTS,
        removed=True,
    ),
    _r(
        "--guided-decoding-disable-any-whitespace",
        "StructuredOutputsConfig",
        B,
        _SO_DEFAULTS,
        removed=True,
    ),
    _r(
        "--guided-decoding-disable-additional-properties",
        "StructuredOutputsConfig",
        B,
        _SO_DEFAULTS,
        removed=True,
    ),
    _r(
        "--enable-reasoning",
        "StructuredOutputsConfig",
        S,
        "older vLLM's switch",
        instead="--reasoning-parser NAME alone",
        removed=True,
    ),
    _r(
        "--expand-tools-even-if-tool-choice-none",
        "Frontend",
        B,
        "kvrun always passes the tools to the template with tool_choice none",
        instead="--exclude-tools-when-tool-choice-none to leave them out",
        accepts=("true",),
        removed=True,
    ),
    _r(
        "--disable-frontend-multiprocessing",
        "Frontend",
        B,
        "kvrun's frontend is one process",
        instead="VLLM_ENABLE_V1_MULTIPROCESSING=0 runs the engine in the server's process",
        removed=True,
    ),
    _r("--prompt-adapters", "Frontend", L, _REMOVED + "kvrun has no prompt adapters", removed=True),
    _r(
        "--task",
        "ModelConfig",
        V,
        "older vLLM's choice of task",
        instead="--runner pooling (with --convert embed or classify) for embed, classify, "
        "score; --runner generate for generate",
        accepts=("auto", "generate"),
        removed=True,
    ),
    _r(
        "--device",
        "DeviceConfig",
        V,
        "the platform is chosen from the environment",
        instead="VLLM_TARGET_DEVICE",
        accepts=("auto",),
        removed=True,
    ),
    _r(
        "--rope-scaling",
        "ModelConfig",
        J,
        "kvrun reads rope scaling from config.json",
        instead="edit a local copy of config.json",
        removed=True,
    ),
    _r(
        "--rope-theta",
        "ModelConfig",
        V,
        "kvrun reads rope theta from config.json",
        instead="edit a local copy of config.json",
        removed=True,
    ),
    _r(
        "--override-pooler-config",
        "ModelConfig",
        J,
        "older vLLM's spelling",
        instead="--pooler-config",
        removed=True,
    ),
    _r("--override-neuron-config", "ModelConfig", J, "kvrun has no Neuron platform", removed=True),
    _w("--max-seq-len-to-capture", "ModelConfig", V, _CUDA_GRAPHS, removed=True),
    _w(
        "--tokenizer-pool-size",
        "ModelConfig",
        V,
        "kvrun tokenizes in the frontend's thread pool",
        accepts=("0",),
        removed=True,
    ),
    _w(
        "--tokenizer-pool-type",
        "ModelConfig",
        V,
        "kvrun tokenizes in the frontend's thread pool",
        removed=True,
    ),
    _w(
        "--tokenizer-pool-extra-config",
        "ModelConfig",
        J,
        "kvrun tokenizes in the frontend's thread pool",
        removed=True,
    ),
    _w(
        "--swap-space",
        "CacheConfig",
        V,
        "kvrun preempts by recomputing, never by swapping (as vLLM V1)",
        removed=True,
    ),
    _r(
        "--preemption-mode",
        "SchedulerConfig",
        V,
        "kvrun preempts by recomputing",
        accepts=("recompute",),
        removed=True,
    ),
    _w(
        "--use-v2-block-manager",
        "SchedulerConfig",
        B,
        "kvrun has one block manager",
        accepts=("true",),
        removed=True,
    ),
    _w(
        "--num-scheduler-steps",
        "SchedulerConfig",
        V,
        "kvrun schedules every step",
        accepts=("1",),
        removed=True,
    ),
    _w(
        "--multi-step-stream-outputs",
        "SchedulerConfig",
        B,
        "kvrun schedules every step",
        removed=True,
    ),
    _w(
        "--num-lookahead-slots",
        "SchedulerConfig",
        V,
        "kvrun reserves no lookahead slots",
        accepts=("0",),
        removed=True,
    ),
    _w(
        "--scheduler-delay-factor",
        "SchedulerConfig",
        V,
        "kvrun schedules waiting prompts without delay",
        accepts=("0",),
        removed=True,
    ),
    _w(
        "--disable-async-output-proc",
        "SchedulerConfig",
        S,
        "kvrun processes outputs after each step",
        removed=True,
    ),
    _w("--cuda-graph-sizes", "CompilationConfig", L, _CUDA_GRAPHS, removed=True),
    _r(
        "--enable-prompt-adapter",
        "LoRAConfig",
        B,
        _REMOVED + "kvrun has no prompt adapters",
        accepts=("false",),
        removed=True,
    ),
    _r(
        "--max-prompt-adapters",
        "LoRAConfig",
        V,
        _REMOVED + "kvrun has no prompt adapters",
        removed=True,
    ),
    _r(
        "--max-prompt-adapter-token",
        "LoRAConfig",
        V,
        _REMOVED + "kvrun has no prompt adapters",
        removed=True,
    ),
    _r("--lora-extra-vocab-size", "LoRAConfig", V, _LORA, removed=True),
    _r("--long-lora-scaling-factors", "LoRAConfig", L, _LORA, removed=True),
    _r("--qlora-adapter-name-or-path", "LoRAConfig", V, _LORA, removed=True),
    _r("--disable-mm-preprocessor-cache", "MultiModalConfig", S, _MM, removed=True),
    _r("--enable-multimodal-encoder-data-parallel", "MultiModalConfig", S, _MM, removed=True),
    _r("--num-redundant-experts", "ParallelConfig", V, _DIST, removed=True),
    _r("--eplb-window-size", "ParallelConfig", V, _DIST, removed=True),
    _r("--eplb-step-interval", "ParallelConfig", V, _DIST, removed=True),
    _r("--eplb-log-balancedness", "ParallelConfig", B, _DIST, removed=True),
    _r("--speculative-model", "SpeculativeConfig", V, _SPEC, removed=True),
    _r("--speculative-model-quantization", "SpeculativeConfig", V, _SPEC, removed=True),
    _r("--num-speculative-tokens", "SpeculativeConfig", V, _SPEC, removed=True),
    _r("--speculative-draft-tensor-parallel-size", "SpeculativeConfig", V, _SPEC, removed=True),
    _r("--speculative-max-model-len", "SpeculativeConfig", V, _SPEC, removed=True),
    _r("--speculative-disable-by-batch-size", "SpeculativeConfig", V, _SPEC, removed=True),
    _r("--speculative-disable-mqa-scorer", "SpeculativeConfig", S, _SPEC, removed=True),
    _r("--ngram-prompt-lookup-max", "SpeculativeConfig", V, _SPEC, removed=True),
    _r("--ngram-prompt-lookup-min", "SpeculativeConfig", V, _SPEC, removed=True),
    _r("--spec-decoding-acceptance-method", "SpeculativeConfig", V, _SPEC, removed=True),
    _r(
        "--typical-acceptance-sampler-posterior-threshold",
        "SpeculativeConfig",
        V,
        _SPEC,
        removed=True,
    ),
    _r("--typical-acceptance-sampler-posterior-alpha", "SpeculativeConfig", V, _SPEC, removed=True),
    _r("--disable-logprobs-during-spec-decoding", "SpeculativeConfig", B, _SPEC, removed=True),
)
