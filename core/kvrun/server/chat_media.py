"""Media content parts of chat messages: checked, fetched, decoded, put on the wire.

Accepted parts (OpenAI's, plus vLLM's ``audio_url``)::

    {"type": "image_url", "image_url": {"url": URL, "detail": "auto" | "low" | "high"}}
    {"type": "video_url", "video_url": {"url": URL}}
    {"type": "input_audio", "input_audio": {"data": BASE64, "format": "wav" | "mp3" | ...}}
    {"type": "audio_url", "audio_url": {"url": URL}}

URL: http(s), ``data:<type>;base64,...`` or ``file://`` (kvrun.multimodal.fetch has the
rules). ``detail`` is accepted and changes nothing (as in vLLM). ``image_embeds`` parts
are refused. A part whose kind the served model does not take is a 400 before anything
is fetched.

The chat template sees a message with media as a list of parts in the shape Hugging
Face processors' templates expect: ``{"type": "text", "text": ...}`` and
``{"type": "image"}`` / ``{"type": "video"}`` / ``{"type": "audio"}`` in the order
given; a message with text parts only is one string, as before.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvrun.errors import ConfigError
from kvrun.multimodal.fetch import MediaFetchError, MediaKind, MediaPolicy, fetch_media
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

# The media of one kind one prompt may carry unless --limit-mm-per-prompt says otherwise.
DEFAULT_MEDIA_PER_PROMPT = 8
# One request's decoded media together (what crosses to the engine).
MAX_REQUEST_MEDIA_BYTES = 512 << 20
_KINDS: tuple[MediaKind, ...] = ("image", "video", "audio")
_URL_PARTS: Mapping[str, MediaKind] = {
    "image_url": "image",
    "video_url": "video",
    "audio_url": "audio",
}
_AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
_ACCEPTED_TYPES = "text, image_url, video_url, input_audio, audio_url"


@dataclass(frozen=True)
class MediaPart:
    kind: MediaKind
    part_type: str  # the part's "type", as the client sent it
    where: str  # "messages[i].content[j]"
    url: str  # input_audio's data arrives here as a data: URL


def _refuse(where: str, message: str) -> ApiError:
    return ApiError(f"{where}: {message}", 400, param=where)


def _media_part(part: Mapping[str, Any], kind: MediaKind, where: str) -> MediaPart:
    part_type = str(part["type"])
    body = part.get(part_type)
    if part_type == "input_audio":
        if not isinstance(body, Mapping) or not isinstance(body.get("data"), str):
            raise _refuse(where, 'an input_audio part needs {"data": BASE64, "format": ...}')
        audio_format = body.get("format")
        if audio_format not in _AUDIO_FORMATS:
            raise _refuse(
                where,
                f"input_audio format {audio_format!r} is not accepted; accepted: "
                + ", ".join(_AUDIO_FORMATS),
            )
        return MediaPart(kind, part_type, where, f"data:audio/{audio_format};base64,{body['data']}")
    if not isinstance(body, Mapping) or not isinstance(body.get("url"), str):
        raise _refuse(where, f'a {part_type} part needs {{"{part_type}": {{"url": URL}}}}')
    if part_type == "image_url" and body.get("detail", "auto") not in ("auto", "low", "high"):
        raise _refuse(where, "image_url.detail must be auto, low or high")
    return MediaPart(kind, part_type, where, body["url"])


def template_content(
    content: Sequence[Any], index: int, accepted: frozenset[str] | Sequence[str], model: str
) -> tuple[str | list[dict[str, Any]], list[MediaPart]]:
    """Message ``index``'s content parts as the template sees them, and its media parts.

    Raises ApiError (400) for a malformed part, an unknown type, ``image_embeds``, or a
    medium the model does not accept.
    """
    out: list[dict[str, Any]] = []
    media: list[MediaPart] = []
    for j, part in enumerate(content):
        where = f"messages[{index}].content[{j}]"
        part_type = part.get("type") if isinstance(part, Mapping) else None
        if part_type == "text":
            if not isinstance(part.get("text"), str):
                raise _refuse(where, "a text part needs a string 'text'")
            out.append({"type": "text", "text": part["text"]})
            continue
        if part_type == "image_embeds":
            raise _refuse(
                where,
                "image_embeds parts are not supported; send the image itself (image_url)",
            )
        kind = _URL_PARTS.get(part_type) if isinstance(part_type, str) else None
        if part_type == "input_audio":
            kind = "audio"
        if kind is None:
            raise _refuse(
                where, f"a part of type {part_type!r} is not accepted; accepted: {_ACCEPTED_TYPES}"
            )
        if kind not in accepted:
            takes = ", ".join(sorted(accepted)) if accepted else "text only"
            raise _refuse(
                where,
                f"{part_type} parts are refused: model {model!r} does not accept {kind} "
                f"inputs (it takes {takes})",
            )
        assert isinstance(part, Mapping)
        media.append(_media_part(part, kind, where))
        out.append({"type": kind})
    if not media:
        return "\n".join(p["text"] for p in out), []
    return out, media


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


async def _load_one(part: MediaPart, policy: MediaPolicy) -> Any:
    from kvrun.multimodal import media

    try:
        data = await fetch_media(part.url, part.kind, policy)
        if part.kind == "image":
            image = await asyncio.to_thread(media.decode_image, data)
            return WireImage.of(image.image)
        if part.kind == "video":
            video = await asyncio.to_thread(media.decode_video, data)
            return WireArray.of(video.frames)
        audio = await asyncio.to_thread(media.decode_audio, data)
        return WireAudio(WireArray.of(audio.samples), audio.sample_rate)
    except (MediaFetchError, media.MediaDecodeError) as exc:
        raise _refuse(part.where, f"the {part.part_type} could not be used: {exc}") from None
    except ImportError as exc:  # a server installed without the media extra
        raise ApiError(
            f"this server cannot decode {part.kind} inputs: {exc.name} is not installed "
            "(pip install 'kvrun[media]')",
            500,
        ) from None


async def load_media(
    parts: Sequence[MediaPart], policy: MediaPolicy, limits: Mapping[str, int]
) -> WireMultiModal:
    """Fetch and decode every part at once (off the event loop's thread for the CPU
    work); the first failure cancels the rest and is a 400 naming its part."""
    for kind in _KINDS:
        count = sum(p.kind == kind for p in parts)
        if count > limits.get(kind, DEFAULT_MEDIA_PER_PROMPT):
            raise ApiError(
                f"the messages carry {count} {kind} items; this server takes at most "
                f"{limits[kind]} per prompt (--limit-mm-per-prompt)",
                400,
                param="messages",
            )
    tasks = [asyncio.ensure_future(_load_one(p, policy)) for p in parts]
    try:
        items = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    total = sum(_nbytes(item) for item in items)
    if total > MAX_REQUEST_MEDIA_BYTES:
        raise ApiError(
            f"the messages' media decode to {total} bytes, more than the "
            f"{MAX_REQUEST_MEDIA_BYTES} one request may carry",
            400,
            param="messages",
        )
    out = WireMultiModal()
    for part, item in zip(parts, items, strict=True):
        getattr(out, part.kind).append(item)
    return out


def _nbytes(item: WireImage | WireArray | WireAudio) -> int:
    return len(item.samples.data) if isinstance(item, WireAudio) else len(item.data)
