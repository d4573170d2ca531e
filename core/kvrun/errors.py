"""Exceptions raised for user errors.

Entry points (the CLI, the server) print a :class:`KvrunError`'s message alone and
exit non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "CommandLineError",
    "ConfigError",
    "KvrunError",
    "ModelLoadError",
    "PluginError",
    "RequestError",
]


class KvrunError(ValueError):
    """A user error: the message names the thing at fault and what is accepted."""


class CommandLineError(KvrunError):
    """A command line kvrun will not run: a flag it does not know, or one it refuses.

    Raised while parsing, before anything loads; the CLI prints ``kvrun VERB: message``.
    """


class ConfigError(KvrunError):
    """A bad configuration value (a VLLM_* variable, an engine option)."""


class PluginError(KvrunError):
    """A platform or general plugin that is missing, unusable or incompatible."""


class ModelLoadError(KvrunError):
    """A model path, checkpoint or tokenizer that cannot be loaded."""


_NO_VALUE = object()


class RequestError(KvrunError):
    """A request refused by its one validation path (SamplingParams, the prompt checks in
    kvrun.validation): the offline API raises it, the server answers 400 with ``param``
    and ``code``.

    Raised through :meth:`invalid` it also carries the value and what is accepted, so a
    route whose request field has another name (chat's ``top_logprobs`` for
    ``logprobs``) can say it in its own words with :meth:`renamed`.
    """

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        value: object = _NO_VALUE,
        accepted: str | None = None,
    ) -> None:
        super().__init__(message)
        self.param = param  # the request field at fault, e.g. "max_tokens"
        self.code = code  # a machine-readable code, e.g. "context_length_exceeded"
        self.value = value
        self.accepted = accepted

    @classmethod
    def invalid(cls, param: str, value: object, accepted: str) -> RequestError:
        """``param=value is invalid; accepted: ...`` (long strings shown cut)."""
        shown = repr(value[:100] if isinstance(value, str) else value)
        return cls(
            f"{param}={shown} is invalid; accepted: {accepted}",
            param=param,
            value=value,
            accepted=accepted,
        )

    def renamed(self, param: str) -> RequestError:
        """The same refusal, naming the field ``param`` as the caller spelled it."""
        if self.param == param:
            return self
        if self.value is not _NO_VALUE and self.accepted is not None:
            renamed = RequestError.invalid(param, self.value, self.accepted)
            renamed.code = self.code
            return renamed
        message = str(self)
        if self.param is not None:
            message = message.replace(self.param, param, 1)
        return RequestError(message, param=param, code=self.code)
