"""OpenAI's error envelope, and the exception the route handlers raise to produce it.

Every error the server answers is ``{"error": {"message", "type", "param", "code"}}``
so the ``openai`` client raises the right exception class with our message.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ApiError", "EngineDeadError", "error_body", "error_type_for"]


# The envelope's "type" as OpenAI's API spells it: "invalid_request_error" for what the
# client must change (any 4xx, a wrong API key included, told apart by "code"), and
# "server_error" for what went wrong here (5xx). vLLM sends the openai SDK's exception
# class names instead ("BadRequestError", ...); the SDK itself picks its exception from
# the status, so clients of either see the same exceptions (docs/serving.md).
def error_type_for(status: int) -> str:
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(
    message: str,
    status: int,
    *,
    param: str | None = None,
    code: str | int | None = None,
) -> dict[str, Any]:
    """The JSON body of an error answer; ``code`` defaults to the status, as vLLM does."""
    return {
        "error": {
            "message": message,
            "type": error_type_for(status),
            "param": param,
            "code": status if code is None else code,
        }
    }


class ApiError(Exception):
    """Raised by a handler to answer ``status`` with the error envelope."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        *,
        param: str | None = None,
        code: str | int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param  # the request field at fault, dotted for nested ones
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, param=self.param, code=self.code)


class EngineDeadError(RuntimeError):
    """The engine stopped (crashed, was killed, or hung past the iteration timeout)."""
