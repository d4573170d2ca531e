"""Exceptions raised for user errors.

Entry points (the CLI, the server) print a :class:`KvrunError`'s message alone and
exit non-zero; anything else is a bug and keeps its traceback.
"""

__all__ = ["ConfigError", "KvrunError", "ModelLoadError", "PluginError"]


class KvrunError(ValueError):
    """A user error: the message names the thing at fault and what is accepted."""


class ConfigError(KvrunError):
    """A bad configuration value (a VLLM_* variable, an engine option)."""


class PluginError(KvrunError):
    """A platform or general plugin that is missing, unusable or incompatible."""


class ModelLoadError(KvrunError):
    """A model path, checkpoint or tokenizer that cannot be loaded."""
