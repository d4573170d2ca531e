"""The server's own options (not the engine's), resolved once from the CLI and env."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvrun.multimodal.fetch import MediaPolicy
from kvrun.server.chat_media import parse_limit_mm_per_prompt
from kvrun.server.data_parallel import DataParallelConfig
from kvrun.server.params import ServerLimits

__all__ = ["ServerConfig"]


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # --api-key, else VLLM_API_KEY; None: no authentication
    root_path: str = ""  # the prefix a proxy strips (--root-path)
    shutdown_timeout: float = 5.0  # seconds in-flight requests get after SIGTERM
    limits: ServerLimits = field(default_factory=ServerLimits)
    max_header_bytes: int = 16384  # all request headers together
    max_body_bytes: int = 8 << 20  # one request body
    body_timeout_s: float = 30.0  # --request-body-timeout: the whole body must arrive by then
    dev_mode: bool = False  # VLLM_SERVER_DEV_MODE: adds /reset_prefix_cache
    profiler_dir: str | None = None  # VLLM_TORCH_PROFILER_DIR: adds /start_profile, /stop_profile
    # VLLM_ALLOW_RUNTIME_LORA_UPDATING: adds /v1/load_lora_adapter, /v1/unload_lora_adapter
    allow_runtime_lora_updating: bool = False
    lora_modules: tuple[tuple[str, str], ...] = ()  # --lora-modules: (name, path) at start
    # --allowed-lora-paths: real directories runtime adapter paths must lie in; () = none
    allowed_lora_paths: tuple[str, ...] = ()
    # --trust-request-chat-template: render templates clients send (else a 400)
    trust_request_chat_template: bool = False
    keep_alive_on_engine_death: bool = False  # VLLM_KEEP_ALIVE_ON_ENGINE_DEATH
    # --enable-auto-tool-choice: tool_choice "auto" reads calls with tool_call_parser
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None  # --tool-call-parser: a name in TOOL_PARSERS
    exclude_tools_when_tool_choice_none: bool = (
        False  # tool_choice "none": no tools to the template
    )
    reasoning_parser: str | None = None  # --reasoning-parser: a name in REASONING_PARSERS
    # where media content parts may come from, fetch timeouts and caps
    # (--allowed-media-domains, --allowed-local-media-path, VLLM_*_FETCH_TIMEOUT,
    # VLLM_ASSETS_CACHE); see kvrun.multimodal.fetch
    media: MediaPolicy = field(default_factory=MediaPolicy)
    # --limit-mm-per-prompt: the most items of each kind one prompt may carry
    limit_mm_per_prompt: dict[str, int] = field(
        default_factory=lambda: parse_limit_mm_per_prompt(None)
    )
    uvicorn_log_level: str = "warning"
    access_log: bool = False
    # --data-parallel-size and the other DP flags / VLLM_DP_*: the engine cores behind us
    data_parallel: DataParallelConfig = field(default_factory=DataParallelConfig)
