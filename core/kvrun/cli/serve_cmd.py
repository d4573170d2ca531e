"""`kvrun serve [MODEL]`: serve a model over an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from typing import Any

__all__ = ["add_arguments", "normalize_argv", "run", "vllm_flags_markdown"]

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="model path, hub id or GGUF file (default: SmolLM2-135M-Instruct)",
    )
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument(
        "--api-key", default=None, help="require this bearer key (wins over VLLM_API_KEY)"
    )
    server.add_argument(
        "--root-path", default="", help="path prefix a reverse proxy strips before forwarding"
    )
    server.add_argument(
        "--shutdown-timeout",
        type=float,
        default=5.0,
        help="seconds in-flight requests get to finish after SIGTERM",
    )
    server.add_argument("--max-n", type=int, default=16, help="cap on n per request")
    server.add_argument(
        "--max-sequences-per-request",
        type=int,
        default=256,
        help="cap on prompts x n in one request",
    )
    server.add_argument(
        "--max-stop-strings", type=int, default=16, help="cap on stop strings per request"
    )
    server.add_argument(
        "--max-stop-string-chars", type=int, default=256, help="cap on one stop string's length"
    )
    server.add_argument("--max-header-bytes", type=int, default=16384)
    server.add_argument("--max-request-body-bytes", type=int, default=8 << 20)
    server.add_argument(
        "--request-body-timeout",
        type=float,
        default=30.0,
        help="seconds a request body may take to arrive (then 408)",
    )
    server.add_argument(
        "--uvicorn-log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
    )
    server.add_argument("--disable-uvicorn-access-log", action="store_true")
    server.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="render chat templates that requests send (refused by default)",
    )
    lora = parser.add_argument_group("LoRA adapters (with --enable-lora)")
    lora.add_argument(
        "--lora-modules",
        nargs="+",
        default=None,
        metavar="NAME=PATH",
        help='adapters served as models from the start: name=path or \'{"name": NAME, '
        '"path": PATH}\'',
    )
    lora.add_argument(
        "--allowed-lora-paths",
        nargs="+",
        default=None,
        metavar="DIR",
        help="directories runtime adapter loads may read from "
        "(VLLM_ALLOW_RUNTIME_LORA_UPDATING=1; default: none, loads refused)",
    )
    media = parser.add_argument_group("media inputs (multimodal models)")
    media.add_argument(
        "--allowed-media-domains",
        nargs="+",
        default=None,
        metavar="HOST",
        help="fetch media URLs from these hosts only (trusted: they may resolve to private "
        "or loopback addresses); default: any host with public addresses only",
    )
    media.add_argument(
        "--allowed-local-media-path",
        default=None,
        metavar="DIR",
        help="accept file:// media URLs inside this directory (symlinks resolved); "
        "default: file:// refused",
    )
    media.add_argument(
        "--limit-mm-per-prompt",
        default=None,
        metavar="JSON",
        help="the most media items of each kind per prompt, e.g. '{\"image\": 2}' "
        "(default: 8 of each)",
    )
    tools = parser.add_argument_group("tool calling and reasoning output")
    tools.add_argument(
        "--enable-auto-tool-choice",
        action=argparse.BooleanOptionalAction,
        default=False,
        help='accept tool_choice "auto": read tool calls from replies with --tool-call-parser',
    )
    tools.add_argument(
        "--tool-call-parser",
        default=None,
        metavar="NAME",
        help="the tool-call format the model writes: hermes, llama3_json, llama4_json, "
        "mistral, pythonic, llama4_pythonic",
    )
    tools.add_argument(
        "--tool-parser-plugin",
        default=None,
        metavar="PATH",
        help="refused: kvrun loads no tool parser plugins (use a built-in --tool-call-parser)",
    )
    tools.add_argument(
        "--exclude-tools-when-tool-choice-none",
        action=argparse.BooleanOptionalAction,
        default=False,
        help='with tool_choice "none", do not pass the tools to the chat template',
    )
    tools.add_argument(
        "--reasoning-parser",
        default=None,
        metavar="NAME",
        help="split <think> reasoning into reasoning_content: deepseek_r1 or qwen3",
    )
    _add_data_parallel_args(parser)
    from kvrun.config import EngineArgs

    EngineArgs.add_cli_args(parser)
    parser.add_argument(
        "--vllm-flags-markdown",
        action="store_true",
        help="print the table of vLLM's serve flags and what kvrun does with each "
        "(docs/serving.md), then exit",
    )
    _add_vllm_flags(parser)


def _add_data_parallel_args(parser: argparse.ArgumentParser) -> None:
    """vLLM's data-parallel flags (docs/distributed.md); None: not given (VLLM_DP_* or
    the default applies, see kvrun.server.data_parallel.resolve_data_parallel)."""
    dp = parser.add_argument_group("data parallelism (docs/distributed.md)")
    dp.add_argument(
        "--data-parallel-size",
        "-dp",
        # not EngineArgs.data_parallel_size's name: None (not given) must not reach it
        dest="data_parallel_size_arg",
        type=int,
        default=None,
        help="engine cores (whole engines) behind this frontend (default: VLLM_DP_SIZE, 1)",
    )
    dp.add_argument(
        "--data-parallel-size-local",
        "-dpl",
        type=int,
        default=None,
        help="how many of the ranks run on this machine (default: all; 1 for an "
        "externally launched rank)",
    )
    dp.add_argument(
        "--data-parallel-start-rank",
        "-dpr",
        type=int,
        default=None,
        help="the rank this process runs (default: VLLM_DP_RANK, 0); >= 1 runs headless",
    )
    dp.add_argument(
        "--data-parallel-address",
        "-dpa",
        default=None,
        help="rank 0's IP address, where it listens for the other ranks (default: "
        "VLLM_DP_MASTER_IP, 127.0.0.1)",
    )
    dp.add_argument(
        "--data-parallel-rpc-port",
        "-dpp",
        type=int,
        default=None,
        help="rank 0's port for the other ranks (default: VLLM_DP_MASTER_PORT, 29550)",
    )
    dp.add_argument(
        "--headless",
        action="store_true",
        help="run a rank's engine core without a frontend; it registers with rank 0",
    )


def _add_vllm_flags(parser: argparse.ArgumentParser) -> None:
    """vLLM's flags kvrun lacks, refused or accepted by name; keep it last in add_arguments
    (it registers only what the parser does not define by then)."""
    from kvrun.cli.vllm_flag_table import FLAGS
    from kvrun.cli.vllm_flags import add_vllm_flags

    parser.allow_abbrev = False  # exact names: a prefix of one flag must not pass as another
    parser.epilog = (
        "vLLM's other serve flags are accepted where they ask for what kvrun does, and "
        "refused by name otherwise: see docs/serving.md or --vllm-flags-markdown."
    )
    add_vllm_flags(parser, FLAGS)


def normalize_argv(argv: list[str]) -> list[str]:
    """vLLM's spellings (``--max_model_len``, ``-O3``, ``--x.key VALUE``) as kvrun reads them."""
    from kvrun.cli.vllm_flag_table import FLAGS
    from kvrun.cli.vllm_flags import normalize_argv as normalize

    return normalize(argv, FLAGS)


def vllm_flags_markdown() -> str:
    """The table of docs/serving.md, from this verb's parser as it is now."""
    from kvrun.cli.vllm_flag_table import FLAGS
    from kvrun.cli.vllm_flags import markdown_table

    parser = argparse.ArgumentParser(prog="kvrun serve")
    add_arguments(parser)
    return markdown_table(FLAGS, parser)


def _positive(name: str, value: float) -> None:
    from kvrun.errors import ConfigError

    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _check_tool_flags(args: argparse.Namespace) -> None:
    from kvrun.errors import ConfigError
    from kvrun.server.reasoning import REASONING_PARSERS
    from kvrun.server.tool_parsers import TOOL_PARSERS

    if args.tool_parser_plugin:
        raise ConfigError(
            f"--tool-parser-plugin {args.tool_parser_plugin!r} is refused: kvrun does not load "
            "tool parser plugins; use a built-in --tool-call-parser: "
            + ", ".join(sorted(TOOL_PARSERS))
        )
    if args.tool_call_parser is not None and args.tool_call_parser not in TOOL_PARSERS:
        raise ConfigError(
            f"--tool-call-parser {args.tool_call_parser!r} is not known; accepted: "
            + ", ".join(sorted(TOOL_PARSERS))
        )
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ConfigError(
            "--enable-auto-tool-choice needs --tool-call-parser NAME (the format the model "
            "writes its calls in): " + ", ".join(sorted(TOOL_PARSERS))
        )
    if args.reasoning_parser is not None and args.reasoning_parser not in REASONING_PARSERS:
        raise ConfigError(
            f"--reasoning-parser {args.reasoning_parser!r} is not known; accepted: "
            + ", ".join(sorted(REASONING_PARSERS))
        )


def run(args: argparse.Namespace, env: Any) -> int:
    from kvrun.config import EngineArgs
    from kvrun.errors import ConfigError
    from kvrun.server.config import ServerConfig
    from kvrun.server.params import ServerLimits
    from kvrun.server.runner import run_server

    if getattr(args, "vllm_flags_markdown", False):
        print(vllm_flags_markdown(), end="")
        return 0
    from kvrun.cli.vllm_flag_table import FLAGS
    from kvrun.cli.vllm_flags import no_effect_warnings

    for line in no_effect_warnings(args, FLAGS):
        logger.warning("%s", line)
    if args.model_tag is not None and args.model is not None and args.model_tag != args.model:
        raise ConfigError(
            f"the model is given twice, as MODEL={args.model_tag!r} and --model={args.model!r}; "
            "give one"
        )
    from kvrun.server.data_parallel import resolve_data_parallel

    data_parallel = resolve_data_parallel(args, env)
    engine_args = replace(EngineArgs.from_cli_args(args), data_parallel_size=data_parallel.size)
    if args.model_tag is not None:
        engine_args = replace(engine_args, model=args.model_tag)
    if data_parallel.headless:
        from kvrun.server.dp_remote import run_headless

        return run_headless(engine_args, env, data_parallel)
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    if args.shutdown_timeout < 0:
        raise ConfigError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    for name in (
        "max_n",
        "max_sequences_per_request",
        "max_stop_strings",
        "max_stop_string_chars",
        "max_header_bytes",
        "max_request_body_bytes",
        "request_body_timeout",
    ):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.api_key == "":
        raise ConfigError("--api-key is empty; give a key, or omit it to use VLLM_API_KEY")
    raw_key = env.raw("VLLM_API_KEY")  # an empty value reads as unset: look at the raw one
    if args.api_key is None and raw_key is not None and not raw_key.strip():
        raise ConfigError(
            "VLLM_API_KEY is set but empty, which would start the server without "
            "authentication; give a key, or unset VLLM_API_KEY to run without one"
        )
    _check_tool_flags(args)
    from kvrun.server.lora import check_allowed_dirs, parse_lora_modules

    lora_modules = parse_lora_modules(args.lora_modules)
    if lora_modules and not engine_args.enable_lora:
        raise ConfigError("--lora-modules needs --enable-lora")
    allowed_lora_paths = check_allowed_dirs(args.allowed_lora_paths)
    from kvrun.multimodal.assets import AssetCache
    from kvrun.multimodal.fetch import MediaPolicy
    from kvrun.server.chat_media import parse_limit_mm_per_prompt

    media = MediaPolicy.from_env(
        env,
        allowed_domains=args.allowed_media_domains,
        allowed_local_path=args.allowed_local_media_path,
        cache=AssetCache(env.VLLM_ASSETS_CACHE),
    )
    limit_mm_per_prompt = parse_limit_mm_per_prompt(args.limit_mm_per_prompt)
    if args.root_path and not args.root_path.startswith("/"):
        raise ConfigError(f"--root-path must start with '/', got {args.root_path!r}")
    config = ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key if args.api_key is not None else env.VLLM_API_KEY,
        root_path=args.root_path.rstrip("/"),
        shutdown_timeout=args.shutdown_timeout,
        limits=ServerLimits(
            max_n=args.max_n,
            max_sequences=args.max_sequences_per_request,
            max_stop_strings=args.max_stop_strings,
            max_stop_string_chars=args.max_stop_string_chars,
        ),
        max_header_bytes=args.max_header_bytes,
        max_body_bytes=args.max_request_body_bytes,
        body_timeout_s=args.request_body_timeout,
        dev_mode=env.VLLM_SERVER_DEV_MODE,
        profiler_dir=env.VLLM_TORCH_PROFILER_DIR,
        allow_runtime_lora_updating=env.VLLM_ALLOW_RUNTIME_LORA_UPDATING,
        lora_modules=lora_modules,
        allowed_lora_paths=allowed_lora_paths,
        media=media,
        limit_mm_per_prompt=limit_mm_per_prompt,
        trust_request_chat_template=args.trust_request_chat_template,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        keep_alive_on_engine_death=env.VLLM_KEEP_ALIVE_ON_ENGINE_DEATH,
        uvicorn_log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
        data_parallel=data_parallel,
    )
    return run_server(engine_args, config, env)
