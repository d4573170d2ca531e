"""`kvrun serve [MODEL]`: serve a model over an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from typing import Any

__all__ = ["add_arguments", "run"]

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
    from kvrun.config import EngineArgs

    EngineArgs.add_cli_args(parser)


def _positive(name: str, value: float) -> None:
    from kvrun.errors import ConfigError

    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def run(args: argparse.Namespace, env: Any) -> int:
    from kvrun.config import EngineArgs
    from kvrun.errors import ConfigError
    from kvrun.server.config import ServerConfig
    from kvrun.server.params import ServerLimits
    from kvrun.server.runner import run_server

    if args.model_tag is not None and args.model is not None and args.model_tag != args.model:
        raise ConfigError(
            f"the model is given twice, as MODEL={args.model_tag!r} and --model={args.model!r}; "
            "give one"
        )
    engine_args = EngineArgs.from_cli_args(args)
    if args.model_tag is not None:
        engine_args = replace(engine_args, model=args.model_tag)
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
        trust_request_chat_template=args.trust_request_chat_template,
        keep_alive_on_engine_death=env.VLLM_KEEP_ALIVE_ON_ENGINE_DEATH,
        uvicorn_log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
    )
    return run_server(engine_args, config, env)
