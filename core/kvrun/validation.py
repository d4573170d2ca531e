"""The request checks that need the model: the prompt and the room left to generate.

With :class:`~kvrun.sampling_params.SamplingParams` (its own fields, and ``verify``
for what needs the vocabulary and the logprob cap) these are the one validation path
of a request: the engine runs them, the offline API raises what they raise, and the
server runs the same functions before queueing a request and answers 400 with the
``param`` they name (in the route's own spelling: ``messages``, ``max_completion_tokens``).
Every request field is checked in exactly one of these places.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvrun.errors import RequestError

__all__ = ["check_prompt", "resolve_max_tokens"]


def check_prompt(
    token_ids: Sequence[int], *, vocab_size: int, max_model_len: int, param: str = "prompt"
) -> None:
    """A prompt must be non-empty, inside the vocabulary and shorter than the model length."""
    if not token_ids:
        raise RequestError(f"{param} is empty", param=param)
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(
            f"{param} holds token id {bad}, outside the vocabulary [0, {vocab_size})",
            param=param,
        )
    if len(token_ids) >= max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, "
            f"your {param} has {len(token_ids)} tokens, leaving no room to generate. "
            "Please reduce the length of the prompt.",
            param=param,
            code="context_length_exceeded",
        )


def resolve_max_tokens(
    requested: int | None,
    *,
    prompt_len: int,
    max_model_len: int,
    param: str = "max_tokens",
    default: int | None = None,
) -> int:
    """``requested`` checked against the room left; unset: ``default`` clipped to it."""
    room = max_model_len - prompt_len
    if requested is None:
        return room if default is None else min(default, room)
    if requested < 1:
        raise RequestError.invalid(param, requested, "an int >= 1")
    if requested > room:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
            f"{requested} in {param}). Please reduce the length of the prompt or {param}.",
            param=param,
            code="context_length_exceeded",
        )
    return requested
