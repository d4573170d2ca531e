"""What the route handlers share: the engine client, the model's facts, the tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvrun.server.config import ServerConfig
from kvrun.server.engine_client import EngineClient
from kvrun.server.errors import ApiError
from kvrun.server.metrics import ServerMetrics
from kvrun.server.wire import EngineInfo

if TYPE_CHECKING:
    from kvrun.tokenizer import Tokenizer

__all__ = ["ServerState"]


@dataclass
class ServerState:
    config: ServerConfig
    client: EngineClient
    info: EngineInfo
    tokenizer: Tokenizer
    metrics: ServerMetrics
    started_at: int  # unix seconds, the "created" of /v1/models
    # LoRA adapters served as models: name -> the path it was loaded from (/v1/models'
    # root); --lora-modules at start, changed by the runtime load/unload routes.
    loras: dict[str, str] = field(default_factory=dict)

    def check_model(self, name: str | None) -> None:
        """A request may omit the model; one it names must be the one served or one of
        its LoRA adapters."""
        if name is not None and name != self.info.model_name and name not in self.loras:
            served = ", ".join(f"`{n}`" for n in [self.info.model_name, *self.loras])
            raise ApiError(
                f"The model `{name}` does not exist; this server serves {served}.",
                404,
                param="model",
                code="model_not_found",
            )

    def lora_for(self, name: str | None) -> str | None:
        """The LoRA adapter a request's ``model`` names, or None for the base model."""
        return name if name is not None and name in self.loras else None

    def check_alive(self) -> None:
        """New work gets 503 once the engine is dead (the server may be kept alive)."""
        reason = self.client.dead_summary
        if reason is not None:
            raise ApiError(f"the engine is dead: {reason}", 503)
