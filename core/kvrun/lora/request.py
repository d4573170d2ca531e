"""The adapter a request runs with, named as vLLM names it (``vllm.lora.request``)."""

from __future__ import annotations

from dataclasses import dataclass

from kvrun.errors import RequestError

__all__ = ["LoRARequest"]


@dataclass(frozen=True)
class LoRARequest:
    """One LoRA adapter: ``LoRARequest("sql", 1, "/adapters/sql")``.

    ``lora_int_id`` identifies the adapter inside one engine (>= 1; two requests with
    the same id share the adapter's slot and its prefix-cache entries, so one id must
    always mean one adapter). ``lora_path`` is a directory in PEFT's format:
    ``adapter_config.json`` and ``adapter_model.safetensors``.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None  # accepted as vLLM's; not checked

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise RequestError.invalid("lora_name", self.lora_name, "a non-empty string")
        if (
            not isinstance(self.lora_int_id, int)
            or isinstance(self.lora_int_id, bool)
            or self.lora_int_id < 1
        ):
            raise RequestError.invalid("lora_int_id", self.lora_int_id, "an integer >= 1")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise RequestError.invalid(
                "lora_path", self.lora_path, "the adapter's directory (PEFT format)"
            )

    # vLLM's short names
    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    @property
    def cache_salt(self) -> bytes:
        """What seeds the prefix-cache chain of this adapter's requests: its id and name,
        so two adapters (and an adapter and none) never share KV blocks."""
        return f"lora:{self.lora_int_id}:{self.lora_name}".encode()
