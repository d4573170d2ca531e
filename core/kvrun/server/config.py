"""The server's own options (not the engine's), resolved once from the CLI and env."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    allow_runtime_lora_updating: bool = False  # accepted; LoRA routes come with LoRA support
    # --trust-request-chat-template: render templates clients send (else a 400)
    trust_request_chat_template: bool = False
    keep_alive_on_engine_death: bool = False  # VLLM_KEEP_ALIVE_ON_ENGINE_DEATH
    uvicorn_log_level: str = "warning"
    access_log: bool = False
