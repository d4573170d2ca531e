"""Media content parts of chat requests on the server: parsed and fetched by the shared
:mod:`kvrun.multimodal.chat_parts` (the offline ``LLM.chat`` uses the same), refusals
turned into 400s naming the part, decoded media put on the wire (:class:`WireMultiModal`:
raw pixels and samples, never encoded files), with the request's ``mm_processor_kwargs``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from kvrun.errors import ConfigError, RequestError
from kvrun.multimodal import chat_parts
from kvrun.multimodal.chat_parts import DEFAULT_MEDIA_PER_PROMPT, KINDS, MediaPart
from kvrun.multimodal.fetch import MediaPolicy
from kvrun.server.errors import ApiError
from kvrun.server.wire import WireArray, WireAudio, WireImage, WireMultiModal

__all__ = [
    "DEFAULT_MEDIA_PER_PROMPT",
    "MAX_REQUEST_MEDIA_BYTES",
    "MediaPart",
    "load_media",
    "parse_limit_mm_per_prompt",
    "template_content",
]

# One request's decoded media together (what crosses to the engine).
MAX_REQUEST_MEDIA_BYTES = 512 << 20
_KINDS = KINDS


def _bad_request(exc: RequestError) -> ApiError:
    return ApiError(str(exc), 400, param=exc.param)


def template_content(
    content: Sequence[Any], index: int, accepted: frozenset[str] | Sequence[str], model: str
) -> tuple[str | list[dict[str, Any]], list[MediaPart]]:
    """:func:`kvrun.multimodal.chat_parts.template_content`; a refusal is a 400."""
    try:
        return chat_parts.template_content(content, index, accepted, model)
    except RequestError as exc:
        raise _bad_request(exc) from None


def parse_limit_mm_per_prompt(value: str | None) -> dict[str, int]:
    """``--limit-mm-per-prompt '{"image": 2, "video": 0}'``: the most items of each kind
    one prompt may carry; kinds not named keep :data:`DEFAULT_MEDIA_PER_PROMPT`."""
    limits: dict[str, int] = dict.fromkeys(_KINDS, DEFAULT_MEDIA_PER_PROMPT)
    if value is None:
        return limits
    try:
        given = json.loads(value)
    except json.JSONDecodeError:
        given = None
    if not isinstance(given, dict):
        raise ConfigError(
            f"--limit-mm-per-prompt {value!r} is not a JSON object such as '{{\"image\": 2}}'"
        )
    for kind, count in given.items():
        if kind not in _KINDS:
            raise ConfigError(
                f"--limit-mm-per-prompt names {kind!r}; accepted: {', '.join(_KINDS)}"
            )
        if isinstance(count, dict):  # vLLM's newer form {"image": {"count": 2, ...}}
            count = count.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ConfigError(
                f"--limit-mm-per-prompt {kind}={count!r} is not a count (an integer >= 0)"
            )
        limits[kind] = count
    return limits


async def load_media(
    parts: Sequence[MediaPart],
    policy: MediaPolicy,
    limits: Mapping[str, int],
    processor_kwargs: Mapping[str, Any] | None = None,
) -> WireMultiModal:
    """Fetch and decode every part at once (off the event loop's thread for the CPU
    work); the first failure cancels the rest and is a 400 naming its part.
    ``processor_kwargs``: the request's ``mm_processor_kwargs``, checked by the engine."""
    try:
        items = await chat_parts.load_parts(parts, policy, limits)
    except RequestError as exc:
        raise _bad_request(exc) from None
    except ImportError as exc:  # a server installed without the media extra
        raise ApiError(
            f"this server cannot decode media inputs: {exc.name} is not installed "
            "(pip install 'kvrun[media]')",
            500,
        ) from None
    out = WireMultiModal(
        processor_kwargs=dict(processor_kwargs) if processor_kwargs is not None else None
    )
    for part, item in zip(parts, items, strict=True):
        if part.kind == "image":
            out.image.append(WireImage.of(item))
        elif part.kind == "video":
            out.video.append(WireArray.of(item))
        else:
            samples, rate = item
            out.audio.append(WireAudio(WireArray.of(samples), rate))
    total = sum(_nbytes(item) for kind in _KINDS for item in getattr(out, kind))
    if total > MAX_REQUEST_MEDIA_BYTES:
        raise ApiError(
            f"the messages' media decode to {total} bytes, more than the "
            f"{MAX_REQUEST_MEDIA_BYTES} one request may carry",
            400,
            param="messages",
        )
    return out


def _nbytes(item: WireImage | WireArray | WireAudio) -> int:
    return len(item.samples.data) if isinstance(item, WireAudio) else len(item.data)
