"""Exceptions raised for user errors.

Entry points (the CLI, the server) print a :class:`KvrunError`'s message alone and
exit non-zero; anything else is a bug and keeps its traceback.
"""

__all__ = ["ConfigError", "KvrunError", "ModelLoadError", "PluginError", "RequestError"]


class KvrunError(ValueError):
    """A user error: the message names the thing at fault and what is accepted."""


class ConfigError(KvrunError):
    """A bad configuration value (a VLLM_* variable, an engine option)."""


class PluginError(KvrunError):
    """A platform or general plugin that is missing, unusable or incompatible."""


class ModelLoadError(KvrunError):
    """A model path, checkpoint or tokenizer that cannot be loaded."""


class RequestError(KvrunError):
    """A request the engine refuses; the server answers 400 with ``param`` and ``code``."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param  # the request field at fault, e.g. "max_tokens"
        self.code = code  # a machine-readable code, e.g. "context_length_exceeded"
